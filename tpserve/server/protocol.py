"""The OpenAI wire format the server speaks: request bodies (strict, unknown fields refused), responses,
stream chunks and error bodies. Only what tpserve does is accepted; a field it would ignore is an error."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_CHOICES = 64  # prompts x n in one request: bounds what one body can queue
MAX_STOPS = 16
MAX_STOP_CHARS = 512
INT64_MAX = 2**63 - 1  # every integer field; what depends on the model (ids, lengths) is checked by the server


class Strict(BaseModel):
    """No type coercion ("5" is not 5) and no unknown fields: a misspelt option fails loudly."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension: usage in every chunk (the benchmark counts tokens)


StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]  # bounds the hold-back search per chunk
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None
Count = Annotated[int, Field(ge=1, le=INT64_MAX)]
TokenIds = list[Annotated[int, Field(ge=0, le=INT64_MAX)]]
Finite = Annotated[float, Field(allow_inf_nan=False)]
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
TopN = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]
Penalty = Annotated[Finite, Field(ge=-2.0, le=2.0)]  # OpenAI's range for presence and frequency
# OpenAI's logit_bias: token ids (as JSON object keys, so strings) to a bias in [-100, 100]; the keys are
# checked against the vocabulary by the server.
LogitBias = Annotated[dict[Annotated[str, Field(max_length=20)], Annotated[Finite, Field(ge=-100.0, le=100.0)]],
                      Field(max_length=MAX_LOGIT_BIAS)]


# Structured output (issue 18): OpenAI's response_format and vLLM's structured_outputs / guided_* fields; the
# sizes of what they carry are bounded by tpserve.structured_outputs, the rest here (docs/server.md).
MAX_REGEX_CHARS = 4096
MAX_GRAMMAR_CHARS = 65536
MAX_GUIDED_CHOICES = 256
Choices = Annotated[list[Annotated[str, Field(min_length=1, max_length=1024)]], Field(min_length=1,
                                                                                    max_length=MAX_GUIDED_CHOICES)]
Regex = Annotated[str, Field(min_length=1, max_length=MAX_REGEX_CHARS)]
GrammarText = Annotated[str, Field(min_length=1, max_length=MAX_GRAMMAR_CHARS)]
Schema = dict[str, Any] | Annotated[str, Field(max_length=MAX_GRAMMAR_CHARS)]


class JsonSchemaFormat(Strict):
    """OpenAI's ``response_format.json_schema``; ``strict`` is accepted (the schema is always enforced)."""

    name: Annotated[str, Field(max_length=64)] = "response"
    description: Annotated[str, Field(max_length=4096)] | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(Strict):
    """vLLM's ``structured_outputs`` object (one of json, regex, choice, grammar, json_object)."""

    json_: Schema | None = Field(default=None, alias="json")
    regex: Regex | None = None
    choice: Choices | None = None
    grammar: GrammarText | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool | None = None  # False: free whitespace in JSON (tpserve's default is none)


class SamplingFields(Strict):
    """What completions and chat share; ``top_k``, ``ignore_eos`` and ``stop_token_ids`` are vLLM's names."""

    model: str | None = None
    max_tokens: Count | None = None
    temperature: Annotated[Finite, Field(ge=0.0)] = 1.0  # below 1e-5 greedy (SamplingParams.greedy)
    top_p: Annotated[Finite, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=0, le=INT64_MAX)] = 0  # the vocabulary's size or more: no top-k
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    seed: Annotated[int, Field(ge=0, le=INT64_MAX)] | None = None
    stop: Stop = None
    stop_token_ids: Annotated[TokenIds, Field(max_length=MAX_STOPS)] | None = None
    ignore_eos: bool = False
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: Annotated[Finite, Field(gt=0.0, le=10.0)] = 1.0  # vLLM's extension, over prompt and output
    min_p: Annotated[Finite, Field(ge=0.0, le=1.0)] = 0.0  # vLLM's extension
    logit_bias: LogitBias | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted for compatibility; the server keeps no per-user state
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: Schema | None = None
    guided_regex: Regex | None = None
    guided_choice: Choices | None = None
    guided_grammar: GrammarText | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sample_logprobs(self) -> int | None:
        """SamplingParams.logprobs: how many top log-probabilities each generated token carries, or None."""
        return None

    def prompt_logprobs(self) -> int | None:
        return None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(SamplingFields):
    prompt: (str | TokenIds | Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES)]
             | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_CHOICES)])
    max_tokens: Annotated[int, Field(ge=0, le=INT64_MAX)] | None = None  # 0 only with echo (lm-eval's scoring)
    logprobs: TopN | None = None  # the chosen token's log-probability and the top N of each token
    echo: bool = False  # the prompt first, with its log-probabilities when logprobs is set

    def sample_logprobs(self) -> int | None:
        return self.logprobs

    def prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None


class ContentPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Count | None = None  # OpenAI's newer name for max_tokens
    add_generation_prompt: bool = True
    logprobs: bool = False
    top_logprobs: TopN | None = None  # needs logprobs: true

    def sample_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# -- responses --------------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV came from the engine's prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    """OpenAI's completions shape: per token its text, log-probability (None for a prompt's first token), the
    most likely tokens' log-probabilities (the chosen one included, as vLLM does) and its offset in the text."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "tpserve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    """A request the server refuses, with what the OpenAI error body needs."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        message = encodable(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = None if param is None else encodable(param)
        self.code = code

    def body(self) -> ErrorResponse:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return ErrorResponse(error=ErrorInfo(message=self.message, type=kind, param=self.param, code=self.code))


def encodable(text: str) -> str:
    """``text`` with what UTF-8 cannot carry escaped: a JSON string may hold a lone surrogate ("\\ud800"),
    and echoing one back would fail to encode the answer. It becomes the six characters ``\\ud800``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")

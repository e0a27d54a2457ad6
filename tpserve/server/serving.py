"""The OpenAI protocol over the engine: a request's checks, its prompts into engine requests (one per
choice), and the answer built from the choices: one JSON body at the end, or server-sent events as the
choices stream.

Every engine request is streamed from the engine, also for a non-streaming answer: stop strings are
matched on the text as it grows, and the request is aborted in the engine the moment one is found, when
the client goes away, or when the server shuts down.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from pydantic import BaseModel

from tpserve.errors import EngineDeadError
from tpserve.proxy.llm import LLM
from tpserve.sampling_params import SamplingParams
from tpserve.server.choices import Choice, merged, run_all
from tpserve.server.http import DONE, EventStream, sse
from tpserve.server.logprobs import chat_logprobs, completion_logprobs
from tpserve.server.metrics import ServerMetrics
from tpserve.server.protocol import (
    MAX_CHOICES,
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Delta,
    PromptTokensDetails,
    SamplingFields,
    Usage,
    encodable,
)
from tpserve.server.structured import structured_from
from tpserve.server.text import StopText


class OpenAIServer:
    """The server's state: the engine, its model name and limits, metrics, and whether it is closing."""

    def __init__(self, llm: LLM, model_name: str | None = None) -> None:
        self.llm = llm
        name = model_name or os.path.basename(str(llm.info.get("model_dir", "model")).rstrip("/"))
        self.model_name = encodable(name)  # a path from argv may hold undecodable bytes as surrogates
        # The longest request the engine can ever hold: a KV pool smaller than max_seq_len bounds it too (the
        # engine would end a longer one with an error).
        self.max_seq_len = min(int(llm.info["max_seq_len"]), int(llm.info.get("kv_cache_tokens") or 2**63))
        self.vocab_size = int(llm.info["vocab_size"])
        self.metrics = ServerMetrics(llm.stats)
        self.closing = False
        # No token spans more characters than the longest vocabulary entry, so a longer text cannot fit the
        # context: it is refused before encoding, which holds the GIL (a few MB would stall every stream).
        tok = llm.tokenizer
        longest = tok.max_token_chars if tok is not None else 1
        self.max_prompt_chars = self.max_seq_len * longest

    def unavailable(self) -> str | None:
        """Why no request can be served now, or None."""
        dead = self.llm.client.dead
        if dead is not None:
            return f"the engine is dead: {dead.splitlines()[0] if dead else 'unknown reason'}"
        if self.closing or self.llm.stats().get("shutting_down"):
            return "the server is shutting down"
        return None

    # -- requests into engine requests ----------------------------------------------------------------

    def check(self, req: SamplingFields) -> None:
        """The model named must be ours, and the engine able to serve."""
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist.", "model", "model_not_found")
        why = self.unavailable()
        if why is not None:
            raise APIError(503, why, code="engine_unavailable")

    def _encode(self, text: str, param: str) -> list[int]:
        if self.llm.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send token ids", param)
        if len(text) > self.max_prompt_chars:
            raise APIError(400, f"{param} has {len(text)} characters: more tokens than this model's maximum context "
                                f"length {self.max_seq_len}", param, "context_length_exceeded")
        try:
            return self.llm.tokenizer.encode(text)
        except (TypeError, ValueError) as e:  # e.g. a lone surrogate, which no UTF-8 text can hold
            raise APIError(400, f"{param} is not valid text: {e}", param) from None

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            return [self._encode(p, "prompt")]
        if not p or isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return [self._encode(x, "prompt") if isinstance(x, str) else list(x) for x in p]  # type: ignore[union-attr]

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        tok = self.llm.tokenizer
        if tok is None or tok.chat_template is None:
            raise APIError(400, "this model has no chat template: use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        # Rendering and encoding hold the GIL: what cannot fit the context is refused before either.
        if len(messages) > self.max_seq_len:
            raise APIError(400, f"{len(messages)} messages: more than this model's maximum context length of "
                                f"{self.max_seq_len} tokens", "messages", "context_length_exceeded")
        chars = sum(len(m["content"]) for m in messages)
        if chars > self.max_prompt_chars:
            raise APIError(400, f"the messages have {chars} characters: more tokens than this model's maximum "
                                f"context length {self.max_seq_len}", "messages", "context_length_exceeded")
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt)
        except Exception as e:  # the template's own raise_exception, or what a hostile message provokes
            raise APIError(400, f"the chat template refused these messages: {e}", "messages") from None
        return self._encode(text, "messages")

    def logit_bias(self, req: SamplingFields) -> dict[int, float] | None:
        """OpenAI's {"token id": bias} with every key a token id of this vocabulary."""
        if not req.logit_bias:
            return None
        bias = {}
        for key, value in req.logit_bias.items():
            if not (key.isascii() and key.isdigit()) or int(key) >= self.vocab_size:
                raise APIError(400, f"logit_bias key {key!r} is not a token id in [0, {self.vocab_size})",
                               "logit_bias")
            bias[int(key)] = value
        return bias

    def start(self, req: SamplingFields, prompts: list[list[int]], default_max: int | None, prompt_param: str,
              received: float, echoes: list[str] | None = None) -> list[Choice]:
        """Checks every prompt against the engine's limits, then submits prompts x n engine requests.
        ``echoes``: each prompt's text, sent before its choices' output (completions' echo)."""
        if len(prompts) * req.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x n={req.n} exceeds {MAX_CHOICES} choices", "n")
        max_tokens = []
        for ids in prompts:
            if not ids:
                raise APIError(400, "the prompt is empty", prompt_param)
            room = self.max_seq_len - len(ids)
            if room < 1:  # before the scan below: a body of millions of ids is refused at once
                raise APIError(400, f"the prompt has {len(ids)} tokens; this model's maximum context length is "
                                    f"{self.max_seq_len}", prompt_param, "context_length_exceeded")
            bad = next((t for t in ids if t >= self.vocab_size), None)
            if bad is not None:
                raise APIError(400, f"token id {bad} is outside the vocabulary [0, {self.vocab_size})", prompt_param)
            asked = req.requested_max_tokens()
            if asked == 0 and echoes is None:
                raise APIError(400, "max_tokens must be at least 1 (0 only with echo, to score the prompt)",
                               "max_tokens")
            wanted = asked if asked is not None else min(default_max or room, room)
            if wanted > room:
                raise APIError(400, f"max_tokens={wanted} plus the prompt's {len(ids)} tokens exceeds this model's "
                                    f"maximum context length {self.max_seq_len}", "max_tokens",
                               "context_length_exceeded")
            max_tokens.append(wanted)
        stop_ids = tuple(req.stop_token_ids or ())
        bad = next((t for t in stop_ids if t >= self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {self.vocab_size})", "stop_token_ids")
        top_k = req.top_k if req.top_k < self.vocab_size else 0  # top-k of the whole vocabulary is no top-k
        bias = self.logit_bias(req)
        structured = structured_from(req)
        stops = req.stop_strings()
        choices: list[Choice] = []
        try:
            for i, (ids, wanted) in enumerate(zip(prompts, max_tokens, strict=True)):
                for j in range(req.n):
                    params = SamplingParams(
                        max_tokens=max(wanted, 1), temperature=req.temperature, top_k=top_k, top_p=req.top_p,
                        seed=None if req.seed is None else (req.seed + j) % 2**63,
                        stop_token_ids=stop_ids, ignore_eos=req.ignore_eos,
                        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                        repetition_penalty=req.repetition_penalty, min_p=req.min_p, logit_bias=bias,
                        logprobs=None if wanted == 0 else req.sample_logprobs(), prompt_logprobs=req.prompt_logprobs(),
                        structured=structured,
                    )
                    stream = self.llm.generate_async(ids, params, streaming=True)
                    choice = Choice(i * req.n + j, i, stream, StopText(stops), received, hidden=wanted == 0,
                                    echo=None if echoes is None else echoes[i])
                    choices.append(choice)
        except BaseException as e:  # none of the choices submitted so far may run on for nobody
            self.finish(choices, "abort")
            if isinstance(e, EngineDeadError):
                raise APIError(503, f"the engine is dead: {e}", code="engine_unavailable") from None
            if isinstance(e, ValueError):  # SamplingParams' own bounds, should any be narrower than ours
                raise APIError(400, str(e)) from None
            raise
        return choices

    def finish(self, choices: list[Choice], reason: str) -> None:
        """Aborts every choice still running in the engine and records each choice's outcome once."""
        for c in choices:
            if c.finish_reason is None:
                c.finish_reason = reason
                c.stream.abort()
            if not c.observed:
                c.observed = True
                times, tokens = c.token_chunks()
                ttft = times[0] - c.received if times else None
                self.metrics.observe(c.finish_reason, c.prompt_len, ttft, times, tokens, time.time() - c.received)

    # -- answers -----------------------------------------------------------------------------------------

    @staticmethod
    def usage(choices: list[Choice]) -> Usage:
        """Tokens of the answer so far; a prompt counts once however many (``n``) choices share it, and its
        cached tokens are its first choice's (the first to reach the engine)."""
        first = {c.prompt_index: c for c in reversed(choices)}.values()
        prompt = sum(c.prompt_len for c in first)
        cached = sum(c.cached_tokens for c in first)
        done = sum(c.tokens for c in choices)
        return Usage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    async def run_to_end(self, request: Request, choices: list[Choice]) -> None:
        """Runs every choice to its end, aborting them all if the client disconnects first; an error if any
        choice failed."""
        try:
            await run_all(choices, request.receive)
        finally:
            self.finish(choices, "abort")
        failed = next((c for c in choices if c.finish_reason in ("error", "abort")), None)
        if failed is not None:
            why = failed.error or "the request was aborted"
            if self.llm.client.dead is not None or failed.finish_reason == "abort":
                raise APIError(503, why, code="engine_unavailable")
            # the backend refused the constraint in the engine (the server's own check passed): the request's fault
            raise APIError(400 if why.startswith("structured output:") else 500, why)

    async def events(self, choices: list[Choice], chunk: Callable[[Choice | None, str], BaseModel],
                     req: SamplingFields, first: list[BaseModel] | None = None) -> AsyncIterator[bytes]:
        """The server-sent events of a streaming answer: ``first`` events, then one per delta of any choice,
        an error event for a failed choice, the usage when asked, and ``[DONE]``."""
        opts = req.stream_options
        try:
            for event in first or []:
                yield sse(event)
            async for c, text in merged(choices):
                event = chunk(c, text)
                if opts is not None and opts.continuous_usage_stats:
                    event.usage = self.usage(choices)  # type: ignore[attr-defined]
                yield sse(event)
                if c.finish_reason == "error":
                    yield sse(APIError(500, c.error or "the request failed").body())
            if opts is not None and opts.include_usage:
                last = chunk(None, "")
                last.usage = self.usage(choices)  # type: ignore[attr-defined]
                yield sse(last)
            yield DONE
        finally:
            self.finish(choices, "abort")


    # -- the two endpoints -------------------------------------------------------------------------------

    def completion_prompts_text(self, req: CompletionRequest, prompts: list[list[int]]) -> list[str]:
        """What echo sends back: each prompt as the client wrote it, or its token ids decoded."""
        p = req.prompt
        if isinstance(p, str):
            texts: list[str | None] = [p]
        elif p and not isinstance(p[0], int):
            texts = [x if isinstance(x, str) else None for x in p]
        else:
            texts = [None]
        tok = self.llm.tokenizer
        return [t if t is not None else (tok.decode(ids) if tok is not None else "")
                for t, ids in zip(texts, prompts, strict=True)]

    def completion_chunk_logprobs(self, c: Choice, k: int) -> CompletionLogprobs:
        """The log-probabilities of what ``c`` sends now: its prompt's first (echo), then its new tokens."""
        out, tok = c.stream.output, self.llm.tokenizer
        lp = CompletionLogprobs()
        if c.echo is not None and not c.echo_sent and out.prompt_logprobs is not None:
            completion_logprobs(tok, out.prompt_token_ids, out.prompt_logprobs, k, c.text_offset, lp)
            c.text_offset = len(c.echo)
        ids, entries = c.take_logprobs()
        completion_logprobs(tok, ids, entries, k, c.text_offset, lp)
        c.text_offset += sum(len(t) for t in lp.tokens[len(lp.tokens) - len(ids):])
        return lp

    async def completions(self, req: CompletionRequest, request: Request) -> CompletionResponse | EventStream:
        received = time.time()
        self.check(req)
        prompts = self.completion_prompts(req)
        echoes = self.completion_prompts_text(req, prompts) if req.echo else None
        choices = self.start(req, prompts, 16, "prompt", received, echoes)
        rid, model = f"cmpl-{uuid.uuid4().hex}", self.model_name
        k = req.logprobs

        def answer(c: Choice, text: str) -> CompletionChoice:
            logprobs = self.completion_chunk_logprobs(c, k) if k is not None else None
            if c.echo is not None and not c.echo_sent:
                text, c.echo_sent = c.echo + text, True
            return CompletionChoice(index=c.index, text=text, logprobs=logprobs, finish_reason=c.finish_reason)

        def chunk(c: Choice | None, text: str) -> CompletionResponse:
            return CompletionResponse(id=rid, model=model, choices=[] if c is None else [answer(c, text)])

        if req.stream:
            return EventStream(self.events(choices, chunk, req), headers={"Cache-Control": "no-cache"})
        await self.run_to_end(request, choices)
        return CompletionResponse(id=rid, model=model, usage=self.usage(choices),
                                  choices=[answer(c, c.text) for c in choices])

    async def chat(self, req: ChatCompletionRequest, request: Request) -> ChatCompletionResponse | EventStream:
        received = time.time()
        self.check(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        choices = self.start(req, [self.chat_prompt(req)], None, "messages", received)
        rid, model = f"chatcmpl-{uuid.uuid4().hex}", self.model_name
        k = req.sample_logprobs()

        def logprobs(c: Choice) -> ChatLogprobs | None:
            return None if k is None else chat_logprobs(self.llm.tokenizer, *c.take_logprobs(), k)

        def chunk(c: Choice | None, text: str) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, model=model, choices=[] if c is None else [
                ChatStreamChoice(index=c.index, delta=Delta(content=text), logprobs=logprobs(c),
                                 finish_reason=c.finish_reason)])

        if req.stream:
            roles = [ChatCompletionChunk(id=rid, model=model, choices=[
                ChatStreamChoice(index=c.index, delta=Delta(role="assistant", content=""))]) for c in choices]
            return EventStream(self.events(choices, chunk, req, roles), headers={"Cache-Control": "no-cache"})
        await self.run_to_end(request, choices)
        return ChatCompletionResponse(id=rid, model=model, usage=self.usage(choices), choices=[
            ChatChoice(index=c.index, message=AssistantMessage(content=c.text), logprobs=logprobs(c),
                       finish_reason=c.finish_reason)
            for c in choices])

"""The OpenAI-compatible HTTP API over one ``LLM``: routes, request checks, and the streams that carry an
engine request to the client (server-sent events, or one JSON answer at the end).

Every engine request is streamed from the engine, also for a non-streaming answer: stop strings are
matched on the text as it grows, and the request is aborted in the engine the moment one is found, when
the client goes away, or when the server shuts down.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tpserve.errors import EngineDeadError
from tpserve.proxy.llm import LLM
from tpserve.proxy.streams import RequestStream
from tpserve.sampling_params import SamplingParams
from tpserve.server.metrics import ServerMetrics
from tpserve.server.protocol import (
    MAX_CHOICES,
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatStreamChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    SamplingFields,
    Usage,
    encodable,
)
from tpserve.server.text import StopText

MAX_BODY_BYTES = 8 << 20
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
DONE = b"data: [DONE]\n\n"


@dataclass
class Choice:
    """One engine request behind one choice of an answer, and what has been sent of it."""

    index: int
    prompt_index: int
    prompt_len: int
    stream: RequestStream
    stop: StopText
    received: float  # when the HTTP request arrived (time.time())
    text: str = ""
    tokens: int = 0
    token_times: list[tuple[float, int]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    observed: bool = False

    async def deltas(self) -> AsyncIterator[str]:
        """Text to send, chunk by chunk (never empty unless final); ``finish_reason`` is set at the end."""
        async for chunk in self.stream:
            if chunk.token_ids:
                self.tokens += len(chunk.token_ids)
                self.token_times.append((time.time(), len(chunk.token_ids)))
            text = self.stop.add(chunk.text, chunk.finished)
            if self.stop.stopped:
                self.finish_reason = "stop"
                self.stream.abort()  # the engine may be several tokens further: they are never sent
            elif chunk.finished:
                self.finish_reason, self.error = chunk.finish_reason or "stop", chunk.error
            self.text += text
            if text or self.finish_reason:
                yield text
            if self.finish_reason:
                return


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

    def start(self, req: SamplingFields, prompts: list[list[int]], default_max: int | None, prompt_param: str,
              received: float) -> list[Choice]:
        """Checks every prompt against the engine's limits, then submits prompts x n engine requests."""
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
        stops = req.stop_strings()
        choices: list[Choice] = []
        try:
            for i, (ids, wanted) in enumerate(zip(prompts, max_tokens, strict=True)):
                for j in range(req.n):
                    params = SamplingParams(
                        max_tokens=wanted, temperature=req.temperature, top_k=top_k, top_p=req.top_p,
                        seed=None if req.seed is None else (req.seed + j) % 2**63,
                        stop_token_ids=stop_ids, ignore_eos=req.ignore_eos,
                    )
                    stream = self.llm.generate_async(ids, params, streaming=True)
                    choices.append(Choice(i * req.n + j, i, len(ids), stream, StopText(stops), received))
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
                ttft = c.token_times[0][0] - c.received if c.token_times else None
                self.metrics.observe(c.finish_reason, c.prompt_len, ttft, c.token_times, time.time() - c.received)

    # -- answers -----------------------------------------------------------------------------------------

    @staticmethod
    def usage(choices: list[Choice]) -> Usage:
        """Tokens of the answer so far; a prompt counts once however many (``n``) choices share it, and its
        cached tokens are its first choice's (the first to reach the engine)."""
        first = {c.prompt_index: c for c in reversed(choices)}.values()
        prompt = sum(c.prompt_len for c in first)
        cached = sum(c.stream.output.num_cached_tokens for c in first)
        done = sum(c.tokens for c in choices)
        return Usage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    async def run_to_end(self, request: Request, choices: list[Choice]) -> None:
        """Runs every choice to its end, aborting them all if the client disconnects first."""

        async def drain(c: Choice) -> None:
            async for _ in c.deltas():
                pass

        work = asyncio.ensure_future(asyncio.gather(*(drain(c) for c in choices)))
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, gone):
                task.cancel()
            self.finish(choices, "abort")
        failed = next((c for c in choices if c.finish_reason in ("error", "abort")), None)
        if failed is not None:
            why = failed.error or "the request was aborted"
            if self.llm.client.dead is not None or failed.finish_reason == "abort":
                raise APIError(503, why, code="engine_unavailable")
            raise APIError(500, why)

    async def events(self, choices: list[Choice], chunk: Callable[[Choice | None, str], BaseModel],
                     req: SamplingFields, first: list[BaseModel] | None = None) -> AsyncIterator[bytes]:
        """The server-sent events of a streaming answer: ``first`` events, then one per delta of any choice,
        an error event for a failed choice, the usage when asked, and ``[DONE]``."""
        opts = req.stream_options
        try:
            for event in first or []:
                yield _sse(event)
            async for c, text in _merged(choices):
                event = chunk(c, text)
                if opts is not None and opts.continuous_usage_stats:
                    event.usage = self.usage(choices)  # type: ignore[attr-defined]
                yield _sse(event)
                if c.finish_reason == "error":
                    yield _sse(APIError(500, c.error or "the request failed").body())
            if opts is not None and opts.include_usage:
                last = chunk(None, "")
                last.usage = self.usage(choices)  # type: ignore[attr-defined]
                yield _sse(last)
            yield DONE
        finally:
            self.finish(choices, "abort")


async def _merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, str]]:
    """The deltas of all choices, in the order they come; one choice needs no tasks."""
    if len(choices) == 1:
        async for text in choices[0].deltas():
            yield choices[0], text
        return
    queue: asyncio.Queue[tuple[Choice, str | None]] = asyncio.Queue()

    async def pump(c: Choice) -> None:
        try:
            async for text in c.deltas():
                queue.put_nowait((c, text))
        finally:
            queue.put_nowait((c, None))

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        left = len(tasks)
        while left:
            c, text = await queue.get()
            if text is None:
                left -= 1
            else:
                yield c, text
    finally:
        for t in tasks:
            t.cancel()


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the body was read already, so only a disconnect is left)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _sse(event: BaseModel) -> bytes:
    return b"data: " + event.model_dump_json().encode() + b"\n\n"


class EventStream(StreamingResponse):
    """A streaming response that closes its generator however the response ends, so a client that
    disconnects aborts its engine requests at once instead of whenever the generator is collected."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


class UTF8Request(Request):
    """A request whose JSON body must be UTF-8 (a UTF-8 BOM is allowed). Starlette hands the raw bytes to
    ``json.loads``, which guesses UTF-16 or UTF-32 from the first bytes and accepts them."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                text = body.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise HTTPException(400, f"the body is not UTF-8 (byte {e.start})") from None
            try:
                self._json = json.loads(text)
            except json.JSONDecodeError:
                raise  # FastAPI reports where
            except (ValueError, RecursionError) as e:  # an integer of over 4,300 digits, nesting too deep
                raise HTTPException(400, f"the body cannot be read as JSON: {e}") from None
        return self._json


class UTF8Route(APIRoute):
    """A route that reads its body as a ``UTF8Request``."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handle = super().get_route_handler()

        async def utf8(request: Request) -> Response:
            return await handle(UTF8Request(request.scope, request.receive))

        return utf8


class BodyLimit:
    """Refuses a body over ``limit`` bytes with 413 while it is read, so no client can make the server hold
    an arbitrarily large body in memory (the error goes through the app's handlers, as an OpenAI body)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, f"the request body exceeds {self.limit} bytes")
            return message

        await self.app(scope, limited if scope["type"] == "http" else receive, send)


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body().model_dump(), status_code=e.status)


def create_app(llm: LLM, model_name: str | None = None) -> FastAPI:
    """The FastAPI app serving ``llm``; ``app.state.server`` is its ``OpenAIServer``."""
    server = OpenAIServer(llm, model_name)
    app = FastAPI(title="tpserve", docs_url=None, redoc_url=None)
    app.router.route_class = UTF8Route
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.state.server = server

    def rejected(request: Request, e: APIError) -> JSONResponse:
        if request.url.path in GENERATION_PATHS and e.status < 500:
            server.metrics.requests.labels("rejected").inc()
        return _error(e)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return rejected(request, e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = list(e.errors())
        loc = [str(x) for x in errors[0].get("loc", ()) if x != "body"] if errors else []
        param = loc[0] if loc and not loc[0].isdigit() else None
        parts = []
        for err in errors[:3]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            msg = "unknown field" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid")
            if err.get("type") == "json_invalid":
                msg = f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')} at character {where}"
                where = ""
            parts.append(f"{where}: {msg}" if where and not where.isdigit() else msg)
        return rejected(request, APIError(400, "; ".join(parts) or "invalid request body", param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        detail = e.detail if isinstance(e.detail, str) else str(e.detail)
        if e.status_code == 400:  # FastAPI could not read the body: not JSON in UTF-8
            detail = f"{detail}: send a JSON object in UTF-8"
        return rejected(request, APIError(e.status_code, detail))

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception) -> JSONResponse:
        """A bug, never a client's doing: an OpenAI body all the same (Starlette logs the traceback)."""
        return _error(APIError(500, f"internal error: {type(e).__name__}: {e}"))

    @app.get("/health")
    async def health() -> Response:
        why = server.unavailable()
        return Response(status_code=200) if why is None else _error(APIError(503, why, code="engine_unavailable"))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=server.model_name, max_model_len=server.max_seq_len)])

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> Any:
        received = time.time()
        server.check(req)
        choices = server.start(req, server.completion_prompts(req), 16, "prompt", received)
        rid, model = f"cmpl-{uuid.uuid4().hex}", server.model_name

        def chunk(c: Choice | None, text: str) -> CompletionResponse:
            return CompletionResponse(id=rid, model=model, choices=[] if c is None else [
                CompletionChoice(index=c.index, text=text, finish_reason=c.finish_reason)])

        if req.stream:
            return EventStream(server.events(choices, chunk, req), headers={"Cache-Control": "no-cache"})
        await server.run_to_end(request, choices)
        return CompletionResponse(id=rid, model=model, usage=server.usage(choices), choices=[
            CompletionChoice(index=c.index, text=c.text, finish_reason=c.finish_reason) for c in choices])

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatCompletionRequest, request: Request) -> Any:
        received = time.time()
        server.check(req)
        choices = server.start(req, [server.chat_prompt(req)], None, "messages", received)
        rid, model = f"chatcmpl-{uuid.uuid4().hex}", server.model_name

        def chunk(c: Choice | None, text: str) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, model=model, choices=[] if c is None else [
                ChatStreamChoice(index=c.index, delta=Delta(content=text), finish_reason=c.finish_reason)])

        if req.stream:
            roles = [ChatCompletionChunk(id=rid, model=model, choices=[
                ChatStreamChoice(index=c.index, delta=Delta(role="assistant", content=""))]) for c in choices]
            return EventStream(server.events(choices, chunk, req, roles), headers={"Cache-Control": "no-cache"})
        await server.run_to_end(request, choices)
        return ChatCompletionResponse(id=rid, model=model, usage=server.usage(choices), choices=[
            ChatChoice(index=c.index, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
            for c in choices])

    return app

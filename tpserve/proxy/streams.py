"""One request's stream on the user's side, fed by the dispatch thread, consumed by sync iteration,
``async for`` or ``await`` (for the final output). Safe for many threads and coroutines at once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from tpserve.proxy.outputs import RequestOutput, StreamChunk, logprobs_dict
from tpserve.proxy.tokenizer import IncrementalDetokenizer

WAIT_SLICE_S = 0.5


class RequestStream:
    def __init__(
        self,
        output: RequestOutput,
        detokenizer: IncrementalDetokenizer | None,
        abort: Callable[[int], None],
        streaming: bool = True,
    ) -> None:
        self.output = output
        self.streaming = streaming  # False: one chunk, at the end
        self._detok = detokenizer
        self._abort = abort
        self._cond = threading.Condition()
        self._chunks: deque[StreamChunk] = deque()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    @property
    def request_id(self) -> int:
        return self.output.request_id

    @property
    def finished(self) -> bool:
        return self.output.finished

    # -- fed by the dispatch thread ----------------------------------------------------------------------

    def on_delta(self, delta: dict[str, Any], received: float) -> None:
        out = self.output
        if out.finished:
            return  # nothing follows the end (a late delta after a local abort or failure)
        m = out.metrics
        for key, value in (delta.get("metrics") or {}).items():
            if hasattr(m, key) and getattr(m, key) is None and isinstance(value, (int, float)):
                setattr(m, key, float(value))
        cached = delta.get("num_cached_tokens")
        if isinstance(cached, int) and not isinstance(cached, bool):
            out.num_cached_tokens = cached
        ids = list(delta.get("token_ids") or [])
        if ids and m.first_token_received is None:
            m.first_token_received = received
        m.chunk_times.append(received)
        finished = bool(delta.get("finished"))
        text = self._detok.add(ids, finished) if self._detok is not None else ""
        out.token_ids.extend(ids)
        out.text += text
        chunk = StreamChunk(out.request_id, ids, text, finished, delta.get("finish_reason"), delta.get("error"))
        prompt_logprobs = delta.get("prompt_logprobs")
        if prompt_logprobs is not None:
            out.prompt_logprobs = [None if e is None else logprobs_dict(e) for e in prompt_logprobs]
        logprobs = delta.get("logprobs")
        if logprobs is not None:
            chunk.logprobs = [logprobs_dict(e) for e in logprobs]
            if out.logprobs is None:
                out.logprobs = []
            out.logprobs.extend(chunk.logprobs)
        if finished:
            out.finish_reason = chunk.finish_reason
            out.error = chunk.error
            m.finished = received
        self._push(chunk, finished)

    def fail(self, reason: str, error: str) -> None:
        """Ends the stream from the user's side (engine death, local abort): a final empty chunk."""
        if not self.output.finished:
            self.output.finish_reason, self.output.error = reason, error
            self.output.metrics.finished = time.time()
            self._push(StreamChunk(self.request_id, [], "", True, reason, error), True)

    def _push(self, chunk: StreamChunk, finished: bool) -> None:
        with self._cond:
            self._chunks.append(chunk)
            if finished:
                self.output.finished = True
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass  # that event loop is closed

    # -- consumed by the user ----------------------------------------------------------------------------

    def abort(self) -> None:
        """Asks the engine to end this request; its stream then ends with finish_reason "abort"."""
        if not self.output.finished:
            self._abort(self.request_id)

    def _next_chunk(self, timeout: float | None) -> StreamChunk | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._chunks:
                if self.output.finished and not self._chunks:
                    raise StopIteration
                left = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, deadline - time.monotonic())
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self._chunks.popleft()

    def __iter__(self) -> RequestStream:
        return self

    def __next__(self) -> StreamChunk:
        chunk = self._next_chunk(None)
        assert chunk is not None
        return chunk

    def result(self, timeout: float | None = None) -> RequestOutput:
        """Waits for the end (the dispatch thread ends every stream, also when the engine dies)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self.output.finished:
                left = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, deadline - time.monotonic())
                if left <= 0:
                    raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s")
                self._cond.wait(left)
        return self.output

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamChunk:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        entry = (loop, event)
        with self._cond:
            self._waiters.append(entry)
        try:
            while True:
                with self._cond:
                    if self._chunks:
                        return self._chunks.popleft()
                    if self.output.finished:
                        raise StopAsyncIteration
                    event.clear()
                await event.wait()
        finally:
            with self._cond:
                self._waiters.remove(entry)

    def __await__(self):
        return self._final().__await__()

    async def _final(self) -> RequestOutput:
        async for _ in self:
            pass
        return self.output

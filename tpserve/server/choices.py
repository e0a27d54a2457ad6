"""The streaming of choices: one engine request behind each choice of an answer, its text passed through
the stop-string filter, the choices' deltas merged in the order they come, and the wait for them all
that a client's disconnect cuts short.

A choice's tokens, text and chunk times are its stream's (``RequestStream.output``, filled by the dispatch
thread); a choice keeps only how much of them has gone to the client, and how it ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.types import Receive

from tpserve.proxy.streams import RequestStream
from tpserve.server.text import StopText


@dataclass
class Choice:
    """One engine request behind one choice of an answer, and what of it the client has been sent."""

    index: int
    prompt_index: int
    stream: RequestStream
    stop: StopText
    received: float  # when the HTTP request arrived (time.time())
    sent_chars: int = 0  # output.text[:sent_chars] went to the client: the filter only holds back and cuts
    # After each chunk taken from the stream, how many of output.token_ids had come: the chunk's tokens are
    # the step, its receipt time is output.metrics.chunk_times at the same index (one per chunk).
    token_marks: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    observed: bool = False  # its outcome is in the metrics
    # max_tokens 0 (echo only): the engine computes one token, which is neither sent nor counted.
    hidden: bool = False
    echo: str | None = None  # the prompt's text, sent before the first delta (completions' echo)
    echo_sent: bool = False
    logprobs_sent: int = 0  # tokens whose log-probabilities went to the client
    text_offset: int = 0  # characters of the token texts sent with log-probabilities (text_offset)

    @property
    def text(self) -> str:
        return self.stream.output.text[: self.sent_chars]

    @property
    def tokens(self) -> int:
        """Tokens taken from the stream (a stop string ends the taking: later tokens are never sent)."""
        return self.token_marks[-1] if self.token_marks else 0

    @property
    def prompt_len(self) -> int:
        return len(self.stream.output.prompt_token_ids)

    @property
    def cached_tokens(self) -> int:
        return self.stream.output.num_cached_tokens

    def take_logprobs(self) -> tuple[list[int], list]:
        """The tokens taken whose log-probabilities were not sent yet, with their entries."""
        out = self.stream.output
        entries = out.logprobs or []
        end = min(self.tokens, len(entries))
        start, self.logprobs_sent = self.logprobs_sent, max(end, self.logprobs_sent)
        return out.token_ids[start:end], entries[start:end]

    def token_chunks(self) -> tuple[list[float], list[int]]:
        """Receipt times and token counts of the chunks taken that carried tokens."""
        times: list[float] = []
        counts: list[int] = []
        before = 0
        for t, mark in zip(self.stream.output.metrics.chunk_times, self.token_marks, strict=False):
            if mark > before:
                times.append(t)
                counts.append(mark - before)
            before = mark
        return times, counts

    async def deltas(self) -> AsyncIterator[str]:
        """Text to send, chunk by chunk (never empty unless final); ``finish_reason`` is set at the end."""
        async for chunk in self.stream:
            if self.hidden:  # the prompt was all that was asked for
                if chunk.finished:
                    self.finish_reason = "length" if chunk.finish_reason in ("stop", "length") else chunk.finish_reason
                    self.error = chunk.error
                    yield ""
                    return
                continue
            self.token_marks.append(self.tokens + len(chunk.token_ids))
            text = self.stop.add(chunk.text, chunk.finished)
            if self.stop.stopped:
                self.finish_reason = "stop"
                self.stream.abort()  # the engine may be several tokens further: they are never sent
            elif chunk.finished:
                self.finish_reason, self.error = chunk.finish_reason or "stop", chunk.error
            self.sent_chars += len(text)
            if text or self.finish_reason:
                yield text
            if self.finish_reason:
                return


async def merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, str]]:
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


async def run_all(choices: list[Choice], receive: Receive) -> None:
    """Takes every choice to its end, or returns as soon as the client disconnects (the caller aborts what
    is left)."""

    async def drain(c: Choice) -> None:
        async for _ in c.deltas():
            pass

    work = asyncio.ensure_future(asyncio.gather(*(drain(c) for c in choices)))
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, gone):
            task.cancel()


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the body was read already, so only a disconnect is left)."""
    while (await receive())["type"] != "http.disconnect":
        pass

"""What the user gets back: per-chunk deltas while streaming, one ``RequestOutput`` at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# vLLM's shape: one dict per position, {token_id: (logprob, rank)}, holding the chosen token and the top k
# (ranks 1-based; the chosen token's rank counts the tokens at least as likely as it).
Logprobs = dict[int, tuple[float, int]]


def logprobs_dict(entry: list[Any]) -> Logprobs:
    """The wire's [[token_id, logprob, rank], ...] (chosen token first) as vLLM's dict, chosen token first."""
    out: Logprobs = {}
    for token, logprob, rank in entry:
        out.setdefault(int(token), (float(logprob), int(rank)))
    return out


@dataclass
class RequestMetrics:
    """Wall-clock times (seconds since the epoch) of one request's life; None where not reached.

    TTFT = first_token_received - arrival_proxy; its parts: queueing to rank 0, waiting for a batch,
    computing the first token, and the hops from the host to the user."""

    arrival_proxy: float | None = None
    arrival_rank0: float | None = None
    first_scheduled: float | None = None
    first_token_host: float | None = None
    first_token_published: float | None = None
    first_token_received: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # receipt time of every chunk, first included
    finished: float | None = None

    @property
    def ttft(self) -> float | None:
        if self.first_token_received is None or self.arrival_proxy is None:
            return None
        return self.first_token_received - self.arrival_proxy


@dataclass
class StreamChunk:
    request_id: int
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[Logprobs] | None = None  # one per token of this chunk, when asked


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    error: str | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    # SamplingParams.logprobs: one dict per generated token; prompt_logprobs: one per prompt token, None first.
    logprobs: list[Logprobs] | None = None
    prompt_logprobs: list[Logprobs | None] | None = None

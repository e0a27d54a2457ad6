"""A request's state inside the executor, replicated identically on every rank."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tpserve.sampling_params import SamplingParams


@dataclass(slots=True)
class RequestDelta:
    """One publish for one request: the new tokens since its last publish, and its end if it ended."""

    request_id: int
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    first: bool = False  # carries the request's first token
    num_cached_tokens: int | None = None  # sent with the first response
    # One entry per token of ``token_ids`` ([[id, logprob, rank], ...], the chosen token first) when asked.
    logprobs: list[Any] | None = None
    prompt_logprobs: list[Any] | None = None  # one per prompt token (None for the first), with the first token

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "token_ids": self.token_ids,
            "finished": self.finished,
            "finish_reason": self.finish_reason,
            "error": self.error,
            "metrics": self.metrics,
            "num_cached_tokens": self.num_cached_tokens,
            "logprobs": self.logprobs,
            "prompt_logprobs": self.prompt_logprobs,
        }


@dataclass(eq=False)  # identity: an id may be reused after an abort, and lists are searched by identity
class Request:
    request_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool
    metrics: dict[str, float] = field(default_factory=dict)
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose K/V are in the cache, counted when a step is scheduled (the step will write them).
    num_computed: int = 0
    # Tokens sampled on the device whose values the host does not know yet (overlap loop: 0 or 1).
    num_pending: int = 0
    num_cached_tokens: int | None = None  # prompt tokens whose KV came from the prefix cache at first admission
    num_cached_blocks: int = 0  # leading full blocks already offered to the prefix cache
    # The sampler's packed parameters (vocabulary size, int32 row), built at the first sampled step.
    sample_row: tuple[int, Any] | None = None
    num_published: int = 0
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    ended: bool = False  # the final response is decided (published or queued): nothing follows it
    penalty_state: Any = None  # the sampler's device rows (counts, prompt mask, bias) for a penalized request
    output_logprobs: list[Any] = field(default_factory=list)  # one entry per output token, when asked
    prompt_logprobs: list[Any] | None = None  # one entry per prompt position (None: not scored yet or first)
    prompt_scored: bool = False  # every prompt position is scored (its first token came): recomputes skip it

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None] * len(self.prompt_token_ids)

    @property
    def scores_prompt(self) -> bool:
        """Its steps must return the logits of every prompt position (prompt_logprobs, not all known yet)."""
        return self.prompt_logprobs is not None and not self.prompt_scored

    @property
    def num_tokens(self) -> int:
        """Prompt + outputs, including a sampled token still on the device."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    def stamp(self, name: str) -> None:
        """Records the first time of a metric (rank 0's wall clock; other ranks record theirs)."""
        if name not in self.metrics:
            self.metrics[name] = time.time()

"""Sampling parameters: validated on the user's side, carried over the wire as a plain dict, validated again
on the engine's side (anything can arrive on the wire)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

INT64_MAX = 2**63 - 1
MAX_TOKEN_ID = 2**31 - 1  # token ids travel as int32 on the device
MAX_STOP_TOKEN_IDS = 1024
# Below this a temperature only sharpens the distribution to its argmax, and dividing logits by it overflows
# float32 to inf (then NaN probabilities): such temperatures are greedy, as in vLLM.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops. ``temperature`` below 1e-5 (0 included) is greedy.

    Invalid values raise ``ValueError`` naming the field at construction, before anything is sent.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SamplingParams.{name}={_short(getattr(self, name))}: {why}")

        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= INT64_MAX:
            raise bad("max_tokens", "must be an integer in [1, 2**63)")
        if not _is_number(self.temperature) or not 0.0 <= _float(self.temperature) < math.inf:
            raise bad("temperature", "must be a finite number >= 0 (0 means greedy)")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= MAX_TOKEN_ID:
            raise bad("top_k", f"must be an integer in [0, {MAX_TOKEN_ID}] (0 disables top-k)")
        if not _is_number(self.top_p) or not 0.0 < _float(self.top_p) <= 1.0:
            raise bad("top_p", "must be a number in (0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= INT64_MAX):
            raise bad("seed", "must be None or an integer in [0, 2**63)")
        if isinstance(self.stop_token_ids, (str, bytes, dict)) or not hasattr(self.stop_token_ids, "__iter__"):
            raise bad("stop_token_ids", "must be a list of token ids")
        stops = tuple(self.stop_token_ids)
        if len(stops) > MAX_STOP_TOKEN_IDS:
            raise bad("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids")
        if not all(_is_int(t) and 0 <= t <= MAX_TOKEN_ID for t in stops):
            raise bad("stop_token_ids", f"must be integer token ids in [0, {MAX_TOKEN_ID}]")
        object.__setattr__(self, "stop_token_ids", stops)
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be a bool")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        """From the wire: unknown keys are ignored; anything malformed raises ``ValueError``."""
        if not isinstance(d, dict):
            raise ValueError(f"SamplingParams: expected a dict, got {type(d).__name__}")
        known = {k: v for k, v in d.items() if isinstance(k, str) and k in cls.__dataclass_fields__}
        return cls(**known)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _float(v: int | float) -> float:
    """A huge int compares as inf instead of raising OverflowError."""
    try:
        return float(v)
    except OverflowError:
        return math.inf


def _short(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."

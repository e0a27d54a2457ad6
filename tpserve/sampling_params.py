"""Sampling parameters: validated on the user's side, carried over the wire as a plain dict, validated again
on the engine's side (anything can arrive on the wire)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from tpserve.structured_outputs import StructuredOutputs

INT64_MAX = 2**63 - 1
MAX_TOKEN_ID = 2**31 - 1  # token ids travel as int32 on the device
MAX_STOP_TOKEN_IDS = 1024
# Below this a temperature only sharpens the distribution to its argmax, and dividing logits by it overflows
# float32 to inf (then NaN probabilities): such temperatures are greedy, as in vLLM.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20  # top log-probabilities per position (OpenAI's and vLLM's default bound)
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
LOGIT_BIAS_RANGE = 100.0
PENALTY_RANGE = 2.0  # presence and frequency penalties, OpenAI's [-2, 2]
MAX_REPETITION_PENALTY = 10.0


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
    # Log-probabilities (vLLM's names): the chosen token's plus the k most likely, from the raw distribution.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Penalties and biases, applied in vLLM's order: logit_bias, repetition, frequency, presence; then
    # temperature, min_p, top-k, top-p.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: dict[int, float] | None = None
    # Structured output (issue 18): a StructuredOutputs, or a dict of its fields ({"json_schema": {...}}).
    structured: StructuredOutputs | None = None

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
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise bad(name, f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -PENALTY_RANGE <= _float(v) <= PENALTY_RANGE:
                raise bad(name, f"must be a number in [-{PENALTY_RANGE:g}, {PENALTY_RANGE:g}]")
            object.__setattr__(self, name, float(v))
        rp = self.repetition_penalty
        if not _is_number(rp) or not 0.0 < _float(rp) <= MAX_REPETITION_PENALTY:
            raise bad("repetition_penalty", f"must be a number in (0, {MAX_REPETITION_PENALTY:g}] (1 disables it)")
        object.__setattr__(self, "repetition_penalty", float(rp))
        if not _is_number(self.min_p) or not 0.0 <= _float(self.min_p) <= 1.0:
            raise bad("min_p", "must be a number in [0, 1]")
        object.__setattr__(self, "min_p", float(self.min_p))
        object.__setattr__(self, "logit_bias", self._checked_bias(bad))
        if self.structured is not None:
            object.__setattr__(self, "structured", StructuredOutputs.coerce(self.structured))

    def _checked_bias(self, bad: Callable[[str, str], ValueError]) -> dict[int, float] | None:
        bias = self.logit_bias
        if bias is None:
            return None
        if not isinstance(bias, dict):
            raise bad("logit_bias", "must be a dict {token_id: bias}")
        if len(bias) > MAX_LOGIT_BIAS:
            raise bad("logit_bias", f"at most {MAX_LOGIT_BIAS} entries")
        out: dict[int, float] = {}
        for t, b in bias.items():
            if not _is_int(t) or not 0 <= t <= MAX_TOKEN_ID:
                raise bad("logit_bias", f"keys must be integer token ids in [0, {MAX_TOKEN_ID}]")
            if not _is_number(b) or not -LOGIT_BIAS_RANGE <= _float(b) <= LOGIT_BIAS_RANGE:
                raise bad("logit_bias", f"values must be numbers in [-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}]")
            out[t] = float(b)
        return out or None

    def __hash__(self) -> int:
        """Hashable as before ``logit_bias`` (a dict, as in vLLM) joined the fields."""
        values = (getattr(self, f.name) for f in fields(self))
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v for v in values))

    @property
    def penalized(self) -> bool:
        """Whether the sampler changes this row's logits before sampling (bias or a penalty)."""
        return (self.logit_bias is not None or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def to_dict(self) -> dict[str, Any]:
        """The wire's plain dict. Shallow (every field that is not a scalar is replaced below):
        ``dataclasses.asdict`` deep-copies recursively, 2x the time on a request's way to rank 0."""
        d = {name: getattr(self, name) for name in self.__dataclass_fields__}
        d["stop_token_ids"] = list(self.stop_token_ids)
        # The wire holds flat lists only (and string keys): the bias travels as two lists.
        bias = d.pop("logit_bias") or {}
        d["logit_bias_token_ids"] = list(bias)
        d["logit_bias_values"] = list(bias.values())
        del d["structured"]
        if self.structured is not None:
            d |= self.structured.to_wire()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        """From the wire: unknown keys are ignored; anything malformed raises ``ValueError``."""
        if not isinstance(d, dict):
            raise ValueError(f"SamplingParams: expected a dict, got {type(d).__name__}")
        known = {k: v for k, v in d.items() if isinstance(k, str) and k in cls.__dataclass_fields__}
        ids, values = d.get("logit_bias_token_ids"), d.get("logit_bias_values")
        if ids or values:
            if not isinstance(ids, list) or not isinstance(values, list) or len(ids) != len(values):
                raise ValueError("SamplingParams.logit_bias: token ids and values must be lists of one length")
            if len(ids) > MAX_LOGIT_BIAS:
                raise ValueError(f"SamplingParams.logit_bias: at most {MAX_LOGIT_BIAS} entries")
            if not all(_is_int(t) for t in ids):
                raise ValueError("SamplingParams.logit_bias: keys must be integer token ids")
            known["logit_bias"] = dict(zip(ids, values, strict=True))
        known["structured"] = StructuredOutputs.from_wire(d)
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

"""Latency arithmetic shared by the server's metrics and both benchmarks, so that they measure alike:
percentiles, and inter-token latency per chunk (vLLM's ITL) and per token."""

from __future__ import annotations

from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 to 100), linear between the two nearest ranks (numpy's default); NaN when
    there is nothing to measure."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def chunk_gaps(times: Sequence[float]) -> list[float]:
    """Gaps between consecutive chunks: vLLM's inter-token latency, one value per chunk after the first."""
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def token_gaps(times: Sequence[float], tokens: Sequence[int]) -> list[float]:
    """Inter-token latency per token: the gap before each chunk shared evenly by the tokens it carried, one
    value per token after the first chunk. ``times`` and ``tokens``: the chunks that carried tokens."""
    return [gap / n for gap, n in zip(chunk_gaps(times), tokens[1:], strict=True) for _ in range(n)]

"""Prometheus metrics of one server: request outcomes and latencies counted here, the engine's load read
from ``LLM.stats()`` at scrape time. A registry per app, so several apps in one process never collide."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tpserve.latency_stats import token_gaps

OUTCOMES = ("stop", "length", "abort", "error", "rejected")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                   1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


# (metric, key of LLM.stats(), help); the names follow vLLM's (vllm:kv_cache_usage_perc, ...).
ENGINE_GAUGES = (
    ("tpserve_num_requests_running", "running", "Requests in the engine's running batch."),
    ("tpserve_num_requests_waiting", "waiting", "Requests queued in the engine, not yet running."),
    ("tpserve_iteration_time_seconds", "iteration_time_s", "Recent mean time of one engine iteration."),
    ("tpserve_kv_cache_usage_perc", "kv_cache_usage", "Fraction of the KV cache blocks in use (1 is 100%)."),
    ("tpserve_prefix_cache_hit_rate", "prefix_cache_hit_rate",
     "Prompt tokens served from the prefix cache / prompt tokens looked up, since the start."),
    ("tpserve_num_free_blocks", "num_free_blocks", "KV cache blocks a new allocation could take."),
)
# Cumulative in the engine: counters, so that rate() works (the exported name gains _total).
ENGINE_COUNTERS = (
    ("tpserve_num_preemptions", "num_preemptions", "Requests preempted (KV freed, recomputed later)."),
    ("tpserve_triton_compiles", "triton_compiles",
     "Triton kernel compiles since the engine was ready (start-up warms every variant: 0 is right)."),
)


class EngineCollector(Collector):
    """The engine's load and KV cache, read when Prometheus scrapes (no thread polls the engine)."""

    def __init__(self, stats: Callable[[], dict]) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        s = self.stats()
        for name, key, doc in ENGINE_GAUGES:
            yield GaugeMetricFamily(name, doc, value=float(s.get(key) or 0.0))
        for name, key, doc in ENGINE_COUNTERS:
            yield CounterMetricFamily(name, doc, value=float(s.get(key) or 0.0))


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tpserve_requests", "Requests by outcome (finish reason, or rejected).",
                                ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # every series exists from the start, so rates work at once
        self.unauthorized = Counter("tpserve_unauthorized_requests",
                                    "Requests refused with 401 for a missing or wrong API key.", registry=r)
        self.prompt_tokens = Counter("tpserve_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("tpserve_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("tpserve_time_to_first_token_seconds", "From request receipt to its first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("tpserve_inter_token_latency_seconds",
                             "Time between tokens (a chunk's gap shared by its tokens).",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("tpserve_e2e_request_latency_seconds", "From request receipt to its end.",
                             buckets=LATENCY_BUCKETS, registry=r)
        r.register(EngineCollector(stats))

    def observe(self, outcome: str, prompt_tokens: int, ttft: float | None, chunk_times: Sequence[float],
                chunk_tokens: Sequence[int], e2e: float) -> None:
        """One finished choice; ``chunk_times`` and ``chunk_tokens``: the chunks that carried tokens to it."""
        self.requests.labels(outcome if outcome in OUTCOMES else "error").inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(sum(chunk_tokens))
        if ttft is not None:
            self.ttft.observe(ttft)
        for gap in token_gaps(chunk_times, chunk_tokens):
            self.itl.observe(gap)
        self.e2e.observe(e2e)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""``tpserve bench serve`` as a real process against a live server (one per module): the report, the JSON
result, the plots, arrival control (rate, concurrency), exact prompt lengths and failure accounting."""

from __future__ import annotations

import json
import math
import random
import sys

import numpy as np
import pytest
from helpers import built_model, run_group
from test_server import MAX_SEQ_LEN, free_port, start_server

from tpserve.bench.serve import Result, random_prompts, summary, throughput_series
from tpserve.latency_stats import percentile, token_gaps
from tpserve.proxy.tokenizer import Tokenizer

STATS = ("mean", "median", "p90", "p99")
SERIES = ("ttft", "tpot", "itl", "itl_token", "e2el")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("bench-server"))
    yield s
    s.stop()


def bench(url: str, out_dir, *args: str, timeout: float = 120) -> tuple[int, str, dict | None]:
    cmd = [sys.executable, "-m", "tpserve.bench.serve", "--base-url", url, "--result-dir", str(out_dir),
           "--result-filename", "result.json", "--seed", "3", *args]
    proc = run_group(cmd, timeout)
    path = out_dir / "result.json"
    return proc.returncode, proc.stdout, json.loads(path.read_text()) if path.exists() else None


def in_flight_max(requests: list[dict]) -> int:
    edges = sorted([(r["start"], 1) for r in requests] + [(r["start"] + r["e2e"], -1) for r in requests])
    level = peak = 0
    for _, step in edges:
        level += step
        peak = max(peak, level)
    return peak


def test_poisson_run_reports_like_vllm(server, tmp_path):
    code, out, res = bench(server.url, tmp_path, "--input-len", "64", "--output-len", "8", "--num-prompts", "24",
                           "--request-rate", "40", "--disable-tqdm")
    assert code == 0, out
    assert "Serving Benchmark Result" in out and "Median TTFT (ms):" in out and "P99 ITL/token (ms):" in out
    assert (res["completed"], res["failed"]) == (24, 0)
    assert res["total_input_tokens"] == 24 * 64  # text prompts of exactly --input-len tokens
    assert res["total_output_tokens"] == 24 * 8
    assert res["tokenizer"] == str(built_model("llama"))
    for name in SERIES:
        values = [res[f"{s}_{name}_ms"] for s in STATS]
        assert all(v >= 0 for v in values), name
        assert res[f"median_{name}_ms"] <= res[f"p90_{name}_ms"] <= res[f"p99_{name}_ms"], name
    assert res["mean_ttft_ms"] > 0 and res["mean_e2el_ms"] > res["mean_ttft_ms"]
    assert res["request_throughput"] > 0
    assert res["total_token_throughput"] == pytest.approx(res["output_throughput"] * (64 + 8) / 8)
    starts = [r["start"] for r in res["requests"]]
    assert starts == sorted(starts) and starts[-1] > 0.1  # spread out by the arrival process, not all at once
    assert all(len(r["chunk_times"]) == len(r["chunk_tokens"]) and sum(r["chunk_tokens"]) == 8
               for r in res["requests"])
    for suffix in ("_latency_cdf.png", "_throughput.png"):
        assert (tmp_path / f"result{suffix}").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_max_concurrency_token_id_prompts_and_progress_bar(server, tmp_path):
    code, out, res = bench(server.url, tmp_path, "--input-len", "40", "--output-len", "6", "--num-prompts", "20",
                           "--max-concurrency", "3", "--prompt-ids", "--random-range-ratio", "0.5", "--no-plots")
    assert code == 0, out
    assert "bench serve: 100%" in out  # the progress bar (on stderr, merged here)
    assert res["completed"] == 20 and res["max_concurrency"] == 3
    assert in_flight_max(res["requests"]) <= 3
    lens = [r["input_len"] for r in res["requests"]]
    assert len(set(lens)) > 3 and all(20 <= n <= 60 for n in lens)
    assert res["total_input_tokens"] == sum(lens)
    assert not (tmp_path / "result_latency_cdf.png").exists()


def test_failures_are_counted_not_fatal(server, tmp_path):
    tok = Tokenizer(built_model("llama"))

    def lengths(seed: int) -> list[int]:
        return [p.input_len + p.output_len for p in random_prompts(tok, 12, 200, 16, 0.3, seed, as_ids=True)]

    # A seed whose first request fits (the test request) and some others do not.
    seed = next(s for s in range(100) if lengths(s)[0] <= MAX_SEQ_LEN and max(lengths(s)) > MAX_SEQ_LEN)
    too_long = sum(n > MAX_SEQ_LEN for n in lengths(seed))
    code, out, res = bench(server.url, tmp_path, "--input-len", "200", "--output-len", "16", "--num-prompts", "12",
                           "--random-range-ratio", "0.3", "--prompt-ids", "--no-plots", "--disable-tqdm",
                           "--seed", str(seed))
    assert code == 0, out
    assert (res["completed"], res["failed"]) == (12 - too_long, too_long)
    assert "HTTP 400" in out and "context length" in out
    failed = [r for r in res["requests"] if r["error"]]
    assert all(r["input_len"] + 16 > MAX_SEQ_LEN for r in failed)


def test_unreachable_server_fails_fast(tmp_path):
    code, out, res = bench(f"http://127.0.0.1:{free_port()}", tmp_path, "--num-prompts", "2", timeout=60)
    assert code == 1 and "cannot list the models" in out and res is None


def test_random_prompts_are_seeded_and_exact():
    tok = Tokenizer(built_model("llama"))
    a = random_prompts(tok, 6, 50, 4, 0.0, seed=1, as_ids=False)
    assert [p.prompt for p in a] == [p.prompt for p in random_prompts(tok, 6, 50, 4, 0.0, seed=1, as_ids=False)]
    assert [p.prompt for p in a] != [p.prompt for p in random_prompts(tok, 6, 50, 4, 0.0, seed=2, as_ids=False)]
    assert all(isinstance(p.prompt, str) and len(tok.encode(p.prompt)) == p.input_len == 50 for p in a)


def test_latency_arithmetic():
    r = Result(input_len=5, start=1.0, ttft=0.1, e2e=0.7, output_len=5,
               chunk_times=[0.1, 0.3, 0.7], chunk_tokens=[1, 2, 2])
    assert r.itls() == pytest.approx([0.2, 0.4])  # per chunk, as vLLM counts
    assert r.token_itls() == pytest.approx([0.1, 0.1, 0.2, 0.2])  # per token: a chunk's gap shared
    assert r.tpot() == pytest.approx(0.6 / 4)
    s = summary([0.001, 0.002, 0.003, 0.004])
    assert s["mean"] == pytest.approx(2.5) and s["median"] == pytest.approx(2.5) and s["p99"] <= 4.0
    assert summary([])["p90"] == 0.0
    starts, rates, width = throughput_series([r], 2.0)
    assert sum(rates) * width == pytest.approx(5)  # every token lands in one bin
    assert len(starts) == len(rates)


def test_shared_percentile_and_token_gaps():
    """The one percentile the benchmarks use is numpy's linear one; per-token gaps share each chunk's gap."""
    rng = random.Random(0)
    for _ in range(200):
        values = [rng.expovariate(1.0) for _ in range(rng.randint(1, 40))]
        q = rng.choice([0, 12.5, 50, 90, 99, 100])
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-12)
    assert math.isnan(percentile([], 50))
    assert token_gaps([1.0, 1.3, 2.0], [3, 1, 2]) == pytest.approx([0.3, 0.35, 0.35])
    assert token_gaps([5.0], [4]) == [] and token_gaps([], []) == []

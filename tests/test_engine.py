"""Engine behaviour through the public API, on one TP-2 engine with the cross-rank check switched on."""

import asyncio
import os
import threading
import time

import pytest
from helpers import built_model

from tpserve import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    os.environ["TPSERVE_CHECK_RANKS"] = "1"  # every publish is compared across ranks
    try:
        engine = LLM(model=str(built_model("llama")), tensor_parallel_size=2, max_seq_len=128, max_batch_size=4)
    finally:
        del os.environ["TPSERVE_CHECK_RANKS"]
    yield engine
    engine.shutdown()


def prompt(i: int, n: int) -> list[int]:
    return [(i * 7919 + j * 104729) % 49000 + 5 for j in range(n)]


STATS_KEYS = {"running", "waiting", "iteration_time_s", "kv_cache_usage", "prefix_cache_hit_rate", "num_preemptions",
              "num_free_blocks", "shutting_down", "triton_compiles", "pending", "dead"}


def test_stats_has_every_key_from_the_start(llm):
    """Before any response has carried the engine's load, every key is there, with the engine's values."""
    stats = llm.stats()
    assert set(stats) >= STATS_KEYS, STATS_KEYS - set(stats)
    assert stats["num_free_blocks"] == llm.info["num_kv_blocks"] - 1  # block 0 is never handed out
    assert stats["kv_cache_usage"] == 0.0 and stats["running"] == stats["waiting"] == stats["pending"] == 0
    assert stats["dead"] is None and stats["shutting_down"] is False


def test_startup_says_where_its_time_went(llm):
    stages = llm.info["startup_stages_s"]
    assert {"load_model", "size_kv_cache", "allocate_kv_cache"} <= set(stages)
    # durations, not clock readings: each within the whole start-up; loading weights takes measurable time
    assert all(0 <= v <= llm.startup_s for v in stages.values()), stages
    assert stages["load_model"] > 0
    # rank 0's own time (imports included) covers its stages and fits inside the proxy's wall time
    assert sum(stages.values()) <= llm.info["startup_s"] <= llm.startup_s + 0.5


def test_continuous_batching_matches_requests_alone(llm):
    prompts = [prompt(i, n) for i, n in enumerate([5, 30, 2, 17, 9, 44])]
    alone = [llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    # Staggered arrivals, more requests than slots (4): requests join and leave the running batch.
    streams = []
    for p in prompts:
        streams.append(llm.generate_stream(p, GREEDY))
        time.sleep(0.01)
    together = [s.result(timeout=60).token_ids for s in streams]
    assert together == alone


def test_chunks_concatenate_to_the_result(llm):
    s = llm.generate_stream(prompt(3, 8), SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))
    chunks = list(s)
    assert [len(c.token_ids) for c in chunks] == [1] * 7
    assert sum((c.token_ids for c in chunks), []) == s.output.token_ids
    assert "".join(c.text for c in chunks) == s.output.text
    assert chunks[-1].finished and chunks[-1].finish_reason == "length"
    assert not any(c.finished for c in chunks[:-1])
    m = s.output.metrics  # the parts of TTFT, in the order a first token travels
    times = [m.arrival_proxy, m.arrival_rank0, m.first_scheduled, m.first_token_host, m.first_token_published,
             m.first_token_received]
    assert None not in times and times == sorted(times), times
    assert len(m.chunk_times) == 7 and m.chunk_times[0] == m.first_token_received


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    p = prompt(1, 6)
    first = llm.generate([p], params)[0].token_ids
    # Same seed inside a busy batch of other sampled requests: same tokens.
    outs = llm.generate([p, prompt(2, 9), p], [params, SamplingParams(max_tokens=12, temperature=1.0), params])
    assert outs[0].token_ids == first and outs[2].token_ids == first
    other = llm.generate([p], SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True))[0]
    assert other.token_ids != first


def test_seeded_rows_of_every_kind_are_the_same_alone_and_at_any_row(llm):
    """Top-p, top-k and min_p rows with seeds, each alone, then all together in two orders beside unseeded
    rows (TP 2, ranks cross-checked): the noise is a function of (seed, counter, token), never of the row."""
    kinds = [SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True),
             SamplingParams(max_tokens=8, temperature=1.2, top_k=20, seed=12, ignore_eos=True),
             SamplingParams(max_tokens=8, temperature=1.0, min_p=0.05, top_p=0.95, seed=13, ignore_eos=True)]
    prompts = [prompt(20 + i, 5 + i) for i in range(len(kinds))]
    alone = [llm.generate([p], k)[0].token_ids for p, k in zip(prompts, kinds, strict=True)]
    noise = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
    batch = llm.generate([prompt(30, 4)] + prompts, [noise] + kinds)
    assert [o.token_ids for o in batch[1:]] == alone
    flipped = llm.generate(prompts[::-1] + [prompt(31, 7)], kinds[::-1] + [noise])
    assert [o.token_ids for o in flipped[:3]] == alone[::-1]


def test_seeded_sampling_reproducible_across_launches(llm):
    params = SamplingParams(max_tokens=12, temperature=0.8, seed=7, ignore_eos=True)
    unseeded = SamplingParams(max_tokens=12, temperature=0.8, ignore_eos=True)
    p = prompt(4, 5)
    here = [o.token_ids for o in llm.generate([p, p], [params, unseeded])]
    os.environ["TPSERVE_CHECK_RANKS"] = "1"
    try:
        with LLM(model=str(built_model("llama")), tensor_parallel_size=2, max_seq_len=128) as other:
            there = [o.token_ids for o in other.generate([p, p], [params, unseeded])]
    finally:
        del os.environ["TPSERVE_CHECK_RANKS"]
    assert there[0] == here[0]
    assert there[1] != here[0]


def test_bad_requests_fail_alone(llm):
    vocab = llm.info["vocab_size"]
    good = [prompt(i, 6) for i in range(3)]
    bad = {
        "empty": ([], "prompt is empty"),
        "too long": (prompt(9, 120), "exceeds max_seq_len 128"),
        "out of vocab": ([1, 2, vocab], f"outside the vocabulary \\[0, {vocab}\\)"),
        "negative": ([1, -5, 2], "token id -5 at position 1"),
    }
    expected_good = [llm.generate([p], GREEDY)[0].token_ids for p in good]
    mixed = [good[0], bad["empty"][0], good[1], bad["too long"][0], bad["out of vocab"][0], bad["negative"][0], good[2]]
    outs = llm.generate(mixed, GREEDY)
    assert [outs[i].token_ids for i in (0, 2, 6)] == expected_good
    for out, (_, message) in zip([outs[1], outs[3], outs[4], outs[5]], bad.values(), strict=True):
        assert out.finish_reason == "error"
        assert out.token_ids == []
        import re

        assert re.search(message, out.error), out.error


def test_bad_call_arguments_raise_at_the_call(llm):
    with pytest.raises(ValueError, match="SamplingParams.temperature"):
        llm.generate([[1, 2]], SamplingParams(temperature=-1))
    for ids in ([1, 2**64], [1, True], [1, 2.0]):  # cannot even travel: refused here, the engine never sees it
        with pytest.raises(ValueError, match="prompt: token ids must be integers"):
            llm.generate([ids], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="SamplingParams.top_k"):
        llm.generate([[1, 2]], SamplingParams(top_k=2**64))
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.generate([[1, 2]], {"max_tokens": 3})
    with pytest.raises(TypeError, match="prompt must be"):
        llm.generate_stream(3.5)


def test_abort_mid_stream_frees_the_request(llm):
    long = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    victim = llm.generate_stream(prompt(5, 4), long)
    others = [llm.generate_stream(prompt(6 + i, 4), SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
              for i in range(2)]
    next(victim)
    victim.abort()
    rest = list(victim)
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    assert len(victim.output.token_ids) < 100
    assert all(o.result(timeout=60).finish_reason == "length" for o in others)
    # The slot came back: a full batch of new requests still runs.
    outs = llm.generate([prompt(i, 3) for i in range(4)], GREEDY)
    assert all(o.finish_reason == "length" for o in outs)


def test_many_threads_and_coroutines(llm):
    p = prompt(7, 5)
    expected = llm.generate([p], GREEDY)[0].token_ids
    results: list[list[int]] = []

    def worker():
        results.append([t for c in llm.generate_stream(p, GREEDY) for t in c.token_ids])

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [expected] * 6

    async def main():
        async def one(streaming: bool):
            if streaming:
                return [t for c in [c async for c in llm.generate_async(p, GREEDY)] for t in c.token_ids]
            return (await llm.generate_async(p, GREEDY, streaming=False)).token_ids

        return await asyncio.gather(*[one(i % 2 == 0) for i in range(8)])

    assert asyncio.run(asyncio.wait_for(main(), 60)) == [expected] * 8


def test_idle_ranks_sleep_instead_of_spinning(llm):
    import psutil

    llm.generate([prompt(1, 3)], GREEDY)
    ranks = [p for p in psutil.Process(llm.workers.pid).children(recursive=True)
             if "tpserve.worker" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    time.sleep(0.5)  # the last publish is out; the engine is idle
    before = [sum(p.cpu_times()[:2]) for p in ranks]
    start = time.monotonic()
    time.sleep(3.0)
    used = [sum(p.cpu_times()[:2]) - b for p, b in zip(ranks, before, strict=True)]
    share = [u / (time.monotonic() - start) for u in used]
    # A spinner takes a core (share ~1; still ~0.5 with 4 runnable processes on 2 cores); a sleeper ~0.01.
    assert all(s < 0.1 for s in share), f"share of a core used while idle, per rank: {share}"
    out = llm.generate([prompt(2, 3)], GREEDY)[0]  # and the doorbell wakes every rank again
    assert out.finish_reason == "length"

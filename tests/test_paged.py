"""The paged KV cache end to end: a pool far smaller than the load (preemptions), long prompts in small step
budgets (chunked prefill), shared prefixes (cache hits), against Hugging Face's greedy tokens at TP 1 and 2."""

import time

import pytest
from helpers import built_model, hf_greedy

from tpserve import LLM, SamplingParams

MAX_TOKENS = 12
PREFIX = [(j * 389) % 48000 + 7 for j in range(24)]  # shared by most prompts: 6 full blocks of 4
PROMPTS = [PREFIX + [(i * 7919 + j * 104729) % 48000 + 5 for j in range(3 + i % 5)] for i in range(8)]
PROMPTS += [[(j * 613) % 48000 + 11 for j in range(45)]]  # long: chunked at max_num_tokens=16
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    model = built_model("llama")
    return [hf_greedy(model, p, MAX_TOKENS) for p in PROMPTS]


def wait_stats(llm: LLM, key: str, want, timeout: float = 5.0):
    """Stats ride along with publishes: the last one carries the state after the last request ended."""
    deadline = time.monotonic() + timeout
    while llm.stats().get(key) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return llm.stats().get(key)


@pytest.mark.parametrize("tp", [1, 2])
def test_small_pool_chunked_prefill_and_prefix_hits_match_hf(reference, tp):
    # 100 tokens of pool for 9 requests of ~30-57 tokens each: most of them wait, many are preempted.
    with LLM(model=str(built_model("llama")), tensor_parallel_size=tp, block_size=4, kv_cache_tokens=100,
             max_num_tokens=16, max_batch_size=8, max_seq_len=64) as llm:
        assert llm.info["kv_cache_tokens"] == 100 and llm.info["block_size"] == 4
        first = llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0]  # fills the cache with the prefix
        assert first.token_ids == reference[0] and first.num_cached_tokens == 0
        streams = [llm.generate_stream(p, GREEDY) if i % 2 else llm.generate_async(p, GREEDY, streaming=False)
                   for i, p in enumerate(PROMPTS)]
        chunks = [list(s) if i % 2 else None for i, s in enumerate(streams)]
        outs = [s.result(timeout=120) for s in streams]
        for i, out in enumerate(outs):
            assert out.token_ids == reference[i], f"prompt {i}"
            if chunks[i] is not None:  # never a chunk repeated or lost, whatever was preempted
                assert sum((c.token_ids for c in chunks[i]), []) == out.token_ids, f"prompt {i}"
                assert all(c.token_ids for c in chunks[i][:-1]), f"prompt {i}"
        assert any(out.num_cached_tokens >= 20 for out in outs[:8])  # the shared prefix came from the cache
        assert outs[8].num_cached_tokens == 0
        stats = llm.stats()
        assert stats["num_preemptions"] > 0, stats
        assert 0 < stats["prefix_cache_hit_rate"] <= 1, stats
        assert wait_stats(llm, "kv_cache_usage", 0.0) == 0.0
        assert wait_stats(llm, "num_free_blocks", 25) == 25  # every one of the 25 blocks back, free or cached


def test_seeded_sampling_is_the_same_with_and_without_preemption():
    sampled = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_k=40, seed=99, ignore_eos=True)
    with LLM(model=str(built_model("llama")), block_size=4, kv_cache_tokens=64, max_num_tokens=16,
             max_batch_size=8, max_seq_len=64) as llm:
        alone = llm.generate([PROMPTS[3]], sampled, use_tqdm=False)[0].token_ids
        before = llm.stats()["num_preemptions"]
        load = [llm.generate_async(p, GREEDY, streaming=False) for p in PROMPTS[4:8]]
        last = llm.generate_stream(PROMPTS[3], sampled)  # admitted last: the first to be preempted
        chunks = list(last)
        for s in load:
            s.result(timeout=120)
        assert llm.stats()["num_preemptions"] > before
        assert last.output.token_ids == alone
        assert sum((c.token_ids for c in chunks), []) == alone


def test_a_request_larger_than_the_pool_ends_alone_with_an_error():
    with LLM(model=str(built_model("llama")), block_size=4, kv_cache_tokens=32, max_seq_len=64) as llm:
        big, ok = llm.generate([PROMPTS[8], PROMPTS[0][:10]], GREEDY, use_tqdm=False)
        assert big.finish_reason == "error" and "can never fit the KV cache pool of 32 tokens" in big.error
        assert ok.finish_reason in ("stop", "length") and len(ok.token_ids) > 0

"""Log-probabilities of generated and prompt tokens against Hugging Face float32 ``log_softmax`` on the same
weights: values, top-k ids and ranks, at TP 1 and TP 2, with chunked prefill and with preemptions."""

from __future__ import annotations

import pytest
import torch
from helpers import _hf_model, built_model

from tpserve import LLM, SamplingParams

TOL = 1e-4


def prompt(i: int, n: int) -> list[int]:
    return [(i * 7919 + j * 104729) % 49000 + 5 for j in range(n)]


def hf_logprobs(model_dir, ids: list[int]) -> torch.Tensor:
    """log_softmax of Hugging Face's float32 logits at every position of ``ids``: row p scores token p + 1."""
    model = _hf_model(str(model_dir))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def check_entry(entry: dict, chosen: int, row: torch.Tensor, k: int) -> None:
    """The chosen token's log-probability and rank, and the top k (ids, values, ranks 1..k), against HF."""
    assert next(iter(entry)) == chosen  # the chosen token comes first
    logprob, rank = entry[chosen]
    value = row[chosen].item()
    assert abs(logprob - value) <= TOL
    # vLLM's rank: how many tokens are at least as likely (a near tie may count either way)
    assert int((row > value + TOL).sum()) + 1 <= rank <= int((row >= value - TOL).sum())
    tops = sorted((r, t, lp) for t, (lp, r) in entry.items() if r <= k)
    assert [r for r, _, _ in tops] == list(range(1, k + 1)), entry
    ref = row.topk(max(k, 1))
    for r, t, lp in tops:
        assert abs(lp - row[t].item()) <= TOL
        # HF's r-th most likely, unless the two differ by less than the tolerance (a near tie)
        assert t == ref.indices[r - 1].item() or abs(ref.values[r - 1].item() - row[t].item()) <= TOL


def check_output(model_dir, out, k: int, prompt_k: int | None) -> None:
    ids = out.prompt_token_ids + out.token_ids
    ref = hf_logprobs(model_dir, ids)
    n = len(out.prompt_token_ids)
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        check_entry(entry, token, ref[n - 1 + i], k)
    if prompt_k is None:
        assert out.prompt_logprobs is None
        return
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == n
    assert out.prompt_logprobs[0] is None
    for j in range(1, n):
        check_entry(out.prompt_logprobs[j], out.prompt_token_ids[j], ref[j - 1], prompt_k)


@pytest.fixture(scope="module")
def model_dir():
    return built_model("llama")


def test_logprobs_match_hf_tp1_with_mixed_rows(model_dir):
    """Rows that ask for nothing, for k=0, for k=5 and for prompt log-probabilities share one batch; greedy
    tokens are unchanged by asking."""
    with LLM(model=str(model_dir), max_seq_len=128, max_batch_size=8) as llm:
        prompts = [prompt(i, n) for i, n in enumerate([7, 19, 3, 26])]
        plain = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        asks = [plain,
                SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0),
                SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=5, prompt_logprobs=3),
                SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True, logprobs=20, prompt_logprobs=0)]
        outs = llm.generate(prompts, asks)
        alone = llm.generate(prompts[:3], plain)
        assert [o.token_ids for o in outs[:3]] == [o.token_ids for o in alone]
        assert outs[0].logprobs is None and outs[0].prompt_logprobs is None
        check_output(model_dir, outs[1], 0, None)
        assert all(len(e) == 1 for e in outs[1].logprobs)
        check_output(model_dir, outs[2], 5, 3)
        check_output(model_dir, outs[3], 20, 0)
        # prompt log-probabilities of a prompt the prefix cache holds: still scored, every position
        again = llm.generate([prompts[3]], asks[2])[0]
        assert again.num_cached_tokens == 0
        check_output(model_dir, again, 5, 3)
        # streamed: each chunk carries its tokens' log-probabilities
        stream = llm.generate_stream(prompts[1], asks[2])
        chunks = list(stream)
        assert sum((c.logprobs for c in chunks if c.token_ids), []) == stream.output.logprobs


def test_logprobs_match_hf_tp2_chunked_and_preempted(model_dir):
    """TP 2, prompts in chunks of 5 tokens, and a KV pool so small that requests are preempted and recomputed
    in the middle of their prompts and of their outputs."""
    with LLM(model=str(model_dir), tensor_parallel_size=2, max_seq_len=96, max_batch_size=4, max_chunk_tokens=5,
             block_size=4, kv_cache_tokens=72) as llm:
        prompts = [prompt(10 + i, n) for i, n in enumerate([23, 17, 29, 11])]
        params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=4, prompt_logprobs=2)
        outs = llm.generate(prompts, params)
        assert llm.stats()["num_preemptions"] > 0
        for out in outs:
            check_output(model_dir, out, 4, 2)

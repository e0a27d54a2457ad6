"""Log-probabilities of generated and prompt tokens against Hugging Face float32 ``log_softmax`` on the same
weights: values, top-k ids and ranks, at TP 1 and TP 2, with chunked prefill and with preemptions."""

from __future__ import annotations

import os

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
        # a bias on a token outside the vocabulary ends that request alone, with a message
        bad = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logit_bias={llm.info["vocab_size"]: 1.0})
        outs = llm.generate(prompts[:2], [bad, plain])
        assert outs[0].finish_reason == "error" and "logit_bias" in outs[0].error and not outs[0].token_ids
        assert outs[1].token_ids == alone[1].token_ids


def test_logprobs_match_hf_tp2_chunked_and_preempted(model_dir):
    """TP 2, prompts in chunks of 5 tokens, and a KV pool so small that requests are preempted and recomputed
    in the middle of their prompts and of their outputs."""
    os.environ["TPSERVE_CHECK_RANKS"] = "1"  # every publish, log-probabilities included, compared across ranks
    try:
        llm = LLM(model=str(model_dir), tensor_parallel_size=2, max_seq_len=96, max_batch_size=4, max_chunk_tokens=5,
                  block_size=4, kv_cache_tokens=72)
    finally:
        del os.environ["TPSERVE_CHECK_RANKS"]
    with llm:
        prompts = [prompt(10 + i, n) for i, n in enumerate([23, 17, 29, 11])]
        params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=4, prompt_logprobs=2)
        outs = llm.generate(prompts, params)
        assert llm.stats()["num_preemptions"] > 0
        for out in outs:
            check_output(model_dir, out, 4, 2)


def hf_logits(model_dir, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return _hf_model(str(model_dir))(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("fused", [False, True])
def test_extra_rows_give_every_asked_positions_logits(model_dir, fused):
    """``LlamaForCausalLM.forward(..., extra_rows=)``: the last-token logits unchanged, and the logits of the
    extra rows equal HF's at those positions, on the CPU path and on the GPU path's wiring (run here on the
    kernels' torch references), in a step of a decode beside a prompt chunk over a cached prefix."""
    from tpserve.kernels import build_cos_sin_cache
    from tpserve.model import AttentionMetadata, KVCache, TPContext, load_model

    model, config = load_model(model_dir, TPContext(), "cpu", torch.float32)
    model.cos_sin = build_cos_sin_cache(model.rotary.inv_freq, 64) if fused else None
    a, b = prompt(1, 6), prompt(2, 13)
    kv = KVCache(config, 1, 8, 4, "cpu", torch.float32)
    tables = [[1, 2], [3, 4, 5, 6]]
    meta, positions = AttentionMetadata.build(tables, [0, 0], [5, 5], 4, "cpu", input_ids=a[:5] + b[:5])
    model(meta.input_ids, positions, meta, kv)
    # step 2: a's last token (a decode) and b's next 8 tokens, scoring b's positions 5..11
    meta, positions = AttentionMetadata.build(tables, [5, 5], [1, 8], 4, "cpu", input_ids=a[5:6] + b[5:13])
    plain = model(meta.input_ids, positions, meta, kv)
    extra_rows = torch.arange(1, 8)  # new tokens 1..7 of the step: b's positions 5..11
    logits, extra = model(meta.input_ids, positions, meta, kv, extra_rows=extra_rows)
    torch.testing.assert_close(logits, plain)
    ref_b = hf_logits(model_dir, b)
    torch.testing.assert_close(extra, ref_b[5:12], atol=TOL, rtol=0)
    torch.testing.assert_close(logits[1], ref_b[12], atol=TOL, rtol=0)
    torch.testing.assert_close(logits[0], hf_logits(model_dir, a)[5], atol=TOL, rtol=0)


class RecordingGraphs:
    """Stands in for CudaGraphs: says every batch fits a graph, and records the replays it is asked for."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.replays = 0

    def pick(self, batch):
        return "bucket"

    def replay(self, key, tables, starts, qlens, ids, from_device, prev_tokens):
        self.replays += 1
        return torch.zeros(len(qlens), self.runner.model.config.vocab_size)


def test_runner_runs_prompt_scoring_steps_eagerly(model_dir):
    """A step that scores prompt positions bypasses the graphs (they return last-token logits only) and hands
    the sampler the logits of those positions; any other step still replays a graph."""
    from tpserve.executor.block_manager import BlockManager
    from tpserve.executor.model_runner import ModelRunner
    from tpserve.executor.request import Request
    from tpserve.executor.scheduler import ScheduledBatch, ScheduledSeq
    from tpserve.model import KVCache, TPContext, load_model

    model, config = load_model(model_dir, TPContext(), "cpu", torch.float32)
    blocks = BlockManager(16, 4)
    runner = ModelRunner(model, KVCache(config, 1, 16, 4, "cpu", torch.float32), blocks, torch.device("cpu"))
    runner.graphs = graphs = RecordingGraphs(runner)
    plain = Request(0, prompt(3, 7), SamplingParams(max_tokens=2), False)
    scored = Request(1, prompt(4, 9), SamplingParams(max_tokens=2, prompt_logprobs=1), False)
    for req in (plain, scored):
        blocks.admit(req.request_id, req.prompt_token_ids)
        blocks.grow(req.request_id, len(req.prompt_token_ids))
    runner.forward(ScheduledBatch([ScheduledSeq(plain, 0, 7, True)]))
    assert graphs.replays == 1 and runner.prompt_logits is None
    logits = runner.forward(ScheduledBatch([ScheduledSeq(plain, 0, 7, True), ScheduledSeq(scored, 0, 5, False)]))
    assert graphs.replays == 1  # eager
    pl = runner.prompt_logits
    assert pl is not None and pl.spans == [(scored, 0, 5)]
    assert pl.targets.tolist() == scored.prompt_token_ids[1:6]
    ref = hf_logits(model_dir, scored.prompt_token_ids)
    torch.testing.assert_close(pl.logits, ref[0:5], atol=TOL, rtol=0)
    torch.testing.assert_close(logits[0], hf_logits(model_dir, plain.prompt_token_ids)[6], atol=TOL, rtol=0)
    # the last chunk scores up to the prompt's second-to-last position (the last one's logits are sampled)
    runner.forward(ScheduledBatch([ScheduledSeq(scored, 5, 4, True)]))
    assert runner.prompt_logits.spans == [(scored, 5, 8)] and graphs.replays == 1
    # once its first token came, every position is scored: a recompute (after a preemption) is a plain step
    scored.prompt_scored = True
    runner.forward(ScheduledBatch([ScheduledSeq(scored, 0, 9, True)]))
    assert runner.prompt_logits is None and graphs.replays == 2

"""The CUDA graphs' host side on CPU: which graph a step replays, how a step is padded into a graph's static
inputs, and that a padded step computes what the unpadded eager step computes (the same model, on the
kernels' torch references), writing nothing outside its own slots but reserved block 0."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tpserve.executor.cuda_graphs import (
    GraphKey,
    GraphPicker,
    StepLayout,
    decode_buckets,
    graph_keys,
    seq_buckets,
    token_buckets,
)
from tpserve.kernels import build_cos_sin_cache
from tpserve.model import AttentionMetadata, KVCache, TPContext, load_model
from tpserve.model.random_model import make_model

BLOCK = 4
MAX_SEQ_LEN = 96


def test_token_buckets_cover_every_step_with_bounded_padding() -> None:
    for max_num_tokens in (16, 100, 2048, 8192, 10000):
        buckets = token_buckets(max_num_tokens)
        assert buckets[0] == min(16, max_num_tokens) and buckets[-1] == max_num_tokens
        assert buckets == sorted(set(buckets))
        for small, big in zip(buckets, buckets[1:], strict=False):
            assert big <= 1.5 * small or big == max_num_tokens, (small, big)  # padding: under a third
    assert token_buckets(8192)[:8] == [16, 24, 32, 48, 64, 96, 128, 192]


def test_seq_buckets_never_exceed_the_tokens_or_the_batch() -> None:
    assert seq_buckets(16, 256) == [4, 16]
    assert seq_buckets(512, 256) == [4, 16, 64, 256]
    assert seq_buckets(512, 10) == [4, 10]
    assert seq_buckets(16, 1) == [1]
    assert decode_buckets(10) == [1, 2, 4, 8, 10]


def oracle(keys: list[GraphKey], num_tokens: int, num_seqs: int) -> GraphKey | None:
    """The picking rule by brute force: the fitting graph of the right kind with the fewest tokens, then
    the fewest sequences."""
    decode = num_tokens == num_seqs
    fits = [k for k in keys if k.decode == decode and k.tokens >= num_tokens and k.seqs >= num_seqs]
    return min(fits, key=lambda k: (k.tokens, k.seqs), default=None)


@pytest.mark.parametrize(("max_batch_size", "max_num_tokens"), [(1, 40), (6, 70), (20, 300)])
def test_every_possible_step_has_its_smallest_graph(max_batch_size: int, max_num_tokens: int) -> None:
    keys = graph_keys(max_batch_size, max_num_tokens)
    pick = GraphPicker(keys)
    assert keys == sorted(keys, key=lambda k: (k.tokens, k.seqs), reverse=True)  # captured largest first
    for t in range(1, max_num_tokens + 1):
        for s in range(1, min(t, max_batch_size) + 1):
            got = pick(t, s)
            assert got is not None and got == oracle(keys, t, s), (t, s, got)
            assert got.decode == (t == s)
    assert pick(max_num_tokens + 1, 1) is None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("graphs") / "qwen3", "qwen3", "tiny", seed=3)


def random_step(rng: random.Random, num_decodes: int, num_chunks: int, num_blocks: int):
    """Tables over distinct blocks (never block 0) but for a shared prefix of some sequences, start positions
    over cached context (a resumed request is a chunk over cached blocks too), decodes first."""
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    shared = [free.pop() for _ in range(2)]
    tables, starts, qlens = [], [], []
    for i in range(num_decodes + num_chunks):
        q = 1 if i < num_decodes else rng.randint(2, 20)
        start = rng.randint(0, MAX_SEQ_LEN - q - 1)
        need = -(-(start + q) // BLOCK)
        table = shared[: min(need, 2)] if rng.random() < 0.3 and start >= 2 * BLOCK else []
        table += [free.pop() for _ in range(need - len(table))]
        tables.append(table)
        starts.append(start)
        qlens.append(q)
    return tables, starts, qlens


@pytest.mark.parametrize("fused", [False, True])
def test_a_padded_step_computes_the_eager_step(model_dir: Path, fused: bool) -> None:
    model, config = load_model(model_dir, TPContext(), "cpu", torch.float32)
    if fused:  # the GPU path's wiring, on the kernels' torch references
        model.cos_sin = build_cos_sin_cache(model.rotary.inv_freq, MAX_SEQ_LEN)
    rng = random.Random(7)
    num_blocks = 12 * (-(-MAX_SEQ_LEN // BLOCK)) + 4
    max_batch_size, max_num_tokens = 12, 128
    keys = graph_keys(max_batch_size, max_num_tokens)
    pick = GraphPicker(keys)
    layout = StepLayout(max(k.tokens for k in keys), max_batch_size, -(-MAX_SEQ_LEN // BLOCK), BLOCK)
    base = KVCache(config, 1, num_blocks, BLOCK, "cpu", torch.float32)
    base.k.normal_(generator=torch.Generator().manual_seed(1))
    base.v.normal_(generator=torch.Generator().manual_seed(2))
    mixes = [(3, 0), (12, 0), (1, 0), (0, 1), (0, 3), (2, 1), (5, 4), (11, 1), (4, 2)]
    for num_decodes, num_chunks in mixes:
        tables, starts, qlens = random_step(rng, num_decodes, num_chunks, num_blocks)
        ids = [rng.randrange(config.vocab_size) for _ in range(sum(qlens))]
        eager_kv = KVCache(config, 1, num_blocks, BLOCK, "cpu", torch.float32)
        eager_kv.k.copy_(base.k), eager_kv.v.copy_(base.v)
        meta, positions = AttentionMetadata.build(tables, starts, qlens, BLOCK, "cpu", input_ids=ids)
        want = model(meta.input_ids, positions, meta, eager_kv)

        key = pick(sum(qlens), len(qlens))
        assert key is not None and key.tokens >= sum(qlens)
        buf = np.full(layout.size, -7, dtype=np.int32)  # whatever a previous step left
        w = layout.fill(buf, key, tables, starts, qlens, ids, [])
        packed = torch.full((layout.size,), -7, dtype=torch.int32)  # the device's buffer, stale columns too
        layout.send(torch.from_numpy(buf), packed, key.seqs, w, non_blocking=False)
        padded_ids, padded_positions, padded_meta = layout.inputs(packed, key)
        graph_kv = KVCache(config, 1, num_blocks, BLOCK, "cpu", torch.float32)
        graph_kv.k.copy_(base.k), graph_kv.v.copy_(base.v)
        out = torch.full((max_batch_size, config.vocab_size), float("nan"))
        got = model(padded_ids, padded_positions, padded_meta, graph_kv, logits_out=out[: key.seqs])
        assert got.data_ptr() == out.data_ptr()
        mix = (num_decodes, num_chunks, key)
        torch.testing.assert_close(got[: len(qlens)], want, atol=2e-5, rtol=2e-5, msg=lambda m, mix=mix: f"{mix}: {m}")
        # padding wrote only reserved block 0: past it, the padded step changed the slots the eager one did,
        # to the same values (up to the float32 rounding of other matmul shapes)
        for cache, eager, before in ((graph_kv.k, eager_kv.k, base.k), (graph_kv.v, eager_kv.v, base.v)):
            changed = (cache[:, 1:] != before[:, 1:]).any(-1).any(-1)
            assert torch.equal(changed, (eager[:, 1:] != before[:, 1:]).any(-1).any(-1)), mix
            torch.testing.assert_close(cache[:, 1:], eager[:, 1:], atol=2e-5, rtol=2e-5)


def test_fill_pads_tokens_and_sequences_as_the_kernels_expect() -> None:
    layout = StepLayout(64, 8, 5, BLOCK)
    buf = np.full(layout.size, -1, dtype=np.int32)
    key = GraphKey(16, 4, False)
    w = layout.fill(buf, key, [[3], [5, 6]], [2, 1], [1, 6], list(range(7)), [(0, 3)])
    r = layout.regions
    assert w == 2  # the longest table's blocks, not the graphs' width of 5
    assert buf[r["qsl"]][:5].tolist() == [0, 1, 7, 7, 7]  # padded sequences: no query
    assert buf[r["seq_lens"]][:4].tolist() == [3, 7, 0, 0]
    assert buf[r["last"]][:4].tolist() == [0, 6, 0, 0]
    assert buf[r["positions"]][:16].tolist() == [2, 1, 2, 3, 4, 5, 6] + [0] * 9
    assert buf[r["slots"]][:7].tolist() == [3 * 4 + 2, 5 * 4 + 1, 5 * 4 + 2, 5 * 4 + 3, 6 * 4, 6 * 4 + 1, 6 * 4 + 2]
    assert buf[r["slots"]][7:16].tolist() == [0] * 9  # padding tokens: slot 0 of reserved block 0
    assert buf[r["ids"]][7:16].tolist() == [0] * 9
    assert (buf[r["where"]][0], buf[r["src"]][0]) == (0, 3)
    assert buf[r["decodes"]][0] == 1  # the leading one-token sequences: the prompt graph's decode kernel's
    assert layout.tables(buf, 4, w).tolist() == [[3, 0], [5, 6], [0, 0], [0, 0]]
    device = torch.full((layout.size,), -1, dtype=torch.int32)
    layout.send(torch.from_numpy(buf), device, 4, w, non_blocking=False)
    assert layout.tables(device, 4).tolist() == [[3, 0, -1, -1, -1], [5, 6, -1, -1, -1], [0, 0, -1, -1, -1],
                                                 [0, 0, -1, -1, -1]]  # columns past w: never read, not sent
    assert torch.equal(device[: layout.tables_at], torch.from_numpy(buf[: layout.tables_at]))
    with pytest.raises(ValueError, match="a block table of 6 blocks exceeds the graphs' 5"):
        layout.fill(buf, key, [[1] * 6], [0], [2], [1, 2], [])
    decode = GraphKey(4, 4, True)
    layout.fill(buf, decode, [[3], [5, 6]], [2, 5], [1, 1], [9, 9], [])
    assert buf[r["qsl"]][:5].tolist() == [0, 1, 2, 3, 4]  # padded decode rows: one token over block 0
    assert buf[r["seq_lens"]][:4].tolist() == [3, 6, 1, 1]
    assert buf[r["slots"]][:4].tolist() == [14, 25, 0, 0]

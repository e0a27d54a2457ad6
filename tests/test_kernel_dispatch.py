"""tpserve.kernels on CPU: the dispatch and launch-shape choices, and that the torch path computes what the
model computes (the Triton kernels are checked against that same path on the GPU: scripts/gpu_kernels.py)."""

from __future__ import annotations

import random
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from tpserve import kernels
from tpserve.kernels import policy
from tpserve.model.config import ModelConfig
from tpserve.model.llama import RMSNorm, RotaryEmbedding, apply_rope

QWEN3 = ModelConfig(
    arch="qwen3", vocab_size=1000, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4, num_kv_heads=2,
    head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling=None, max_position_embeddings=512,
    tie_word_embeddings=True, attention_bias=False, qk_norm=True, eos_token_ids=(2,), bos_token_id=1,
)


def test_import_and_cpu_calls_never_import_triton() -> None:
    code = (
        "import sys, torch\n"
        "from tpserve import kernels\n"
        "x = torch.randn(3, 8)\n"
        "kernels.add_rmsnorm(x, x, torch.ones(8), 1e-6)\n"
        "kernels.silu_and_mul(x)\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("device", "importable", "disabled", "expected"),
    [
        ("cuda", True, False, "triton"),
        ("cuda", False, False, "torch"),
        ("cuda", True, True, "torch"),
        ("cpu", True, False, "torch"),
        ("meta", True, False, "torch"),
    ],
)
def test_select_backend(device: str, importable: bool, disabled: bool, expected: str) -> None:
    assert policy.select_backend(device, importable, disabled) == expected


def test_cpu_tensors_take_the_torch_path() -> None:
    assert policy.backend_for(torch.zeros(1)) == "torch"


def test_attention_path_from_shapes() -> None:
    assert policy.attention_path(num_tokens=32, num_seqs=32) == "decode"
    assert policy.attention_path(num_tokens=1, num_seqs=1) == "decode"
    assert policy.attention_path(num_tokens=33, num_seqs=32) == "varlen"
    assert policy.attention_path(num_tokens=512, num_seqs=1) == "varlen"


@pytest.mark.parametrize("num_seqs", [1, 2, 3, 8, 32, 64, 256])
@pytest.mark.parametrize("num_kv_heads", [1, 3, 8])
@pytest.mark.parametrize("max_context", [16, 64, 65, 640, 4096, 32768])
def test_num_kv_splits(num_seqs: int, num_kv_heads: int, max_context: int) -> None:
    splits = policy.num_kv_splits(num_seqs, num_kv_heads, max_context, num_sms=132)
    assert 1 <= splits <= policy.MAX_KV_SPLITS
    assert splits & (splits - 1) == 0  # the reduce kernel loads the splits as one power-of-two block
    tiles = -(-max_context // policy.DECODE_BLOCK_N)
    assert splits <= policy.next_power_of_2(tiles)
    if num_seqs * num_kv_heads >= 2 * 132:
        assert splits == 1  # the grid already fills the machine: no reduce pass
    if max_context >= 4096 and num_seqs * num_kv_heads <= 8:
        assert splits >= 32  # a lone long decode spreads over the machine


def test_varlen_block_m() -> None:
    assert policy.varlen_block_m(num_tokens=40, num_seqs=32, group_pad=2) == 16  # mostly decodes
    assert policy.varlen_block_m(num_tokens=2048, num_seqs=4, group_pad=2) == 64  # prefill
    for group_pad in (1, 2, 4, 8, 16):
        block_m = policy.varlen_block_m(40, 32, group_pad)
        assert block_m >= group_pad and block_m % group_pad == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_and_silu_match_the_model(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    norm = RMSNorm(48, 1e-5).to(dtype)
    norm.weight.copy_(1 + 0.3 * torch.randn(48))
    x, residual = torch.randn(5, 48, dtype=dtype), 4 * torch.randn(5, 48, dtype=dtype)
    normed, new_residual = kernels.add_rmsnorm(x, residual, norm.weight, 1e-5)
    assert torch.equal(new_residual, residual + x)
    assert torch.equal(normed, norm(residual + x))
    assert torch.equal(kernels.rms_norm(x, norm.weight, 1e-5), norm(x))
    gate_up = 3 * torch.randn(5, 2, 40, dtype=dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(kernels.silu_and_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rope_store_matches_the_model(qk_norm: bool, dtype: torch.dtype) -> None:
    """The model's own modules (per-head RMSNorm, RotaryEmbedding, apply_rope) give the same q and cache."""
    torch.manual_seed(1)
    config = replace(QWEN3, qk_norm=qk_norm)
    t, hq, hkv, d, block_size = 7, config.num_heads, config.num_kv_heads, config.head_dim, 4
    qkv = torch.randn(t, (hq + 2 * hkv) * d, dtype=dtype)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.unflatten(-1, (hq, d)), k.unflatten(-1, (hkv, d)), v.unflatten(-1, (hkv, d))
    positions = torch.tensor([0, 1, 2, 37, 38, 300, 511], dtype=torch.int32)
    q_norm, k_norm = RMSNorm(d, 1e-6).to(dtype), RMSNorm(d, 1e-6).to(dtype)
    q_norm.weight.copy_(1 + 0.2 * torch.randn(d))
    k_norm.weight.copy_(1 + 0.2 * torch.randn(d))
    rotary = RotaryEmbedding(config)
    cos_sin = kernels.build_cos_sin_cache(rotary.inv_freq, config.max_position_embeddings)
    k_cache = torch.zeros(6, block_size, hkv, d, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([4, 5, 6, 7, 13, 22, 23], dtype=torch.int32)
    weights = (q_norm.weight, k_norm.weight) if qk_norm else (None, None)
    q_out = kernels.qk_norm_rope_store(q, k, v, positions, cos_sin, *weights, 1e-6, k_cache, v_cache, slots)

    cos, sin = rotary(positions.long(), dtype)
    q_model, k_model = (q_norm(q), k_norm(k)) if qk_norm else (q, k)
    q_model, k_model = apply_rope(q_model, cos, sin), apply_rope(k_model, cos, sin)
    tol = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {"atol": 0, "rtol": 0}
    torch.testing.assert_close(q_out, q_model, **tol)
    flat_k, flat_v = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    torch.testing.assert_close(flat_k[slots.long()], k_model, **tol)
    assert torch.equal(flat_v[slots.long()], v)
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[slots.long()] = False
    assert not flat_k[untouched].any() and not flat_v[untouched].any()


def test_store_kv_by_slot_mapping() -> None:
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    k_cache, v_cache = torch.zeros(4, 4, 2, 8), torch.zeros(4, 4, 2, 8)
    slots = torch.tensor([13, 2, 4, 0, 1], dtype=torch.int32)  # the last two: padding rows into block 0
    kernels.store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache[3, 1], k[0]) and torch.equal(v_cache[0, 2], v[1])
    assert torch.equal(k_cache[1, 0], k[2]) and torch.equal(v_cache[1, 0], v[2])
    assert torch.count_nonzero(k_cache[2]) == 0 and torch.count_nonzero(k_cache[1, 1:]) == 0


def test_paged_attention_over_shuffled_blocks() -> None:
    """Mixed batch (decodes, a chunk over a cached prefix, a fresh prompt) through shuffled, partly shared
    block tables, against float64 attention over each sequence's contiguous K/V."""
    rng = random.Random(3)
    torch.manual_seed(3)
    block_size, hq, hkv, d = 4, 6, 2, 8
    q_lens, ctx_lens = [1, 5, 9, 1], [11, 12, 9, 1]
    contexts = [(torch.randn(c, hkv, d), torch.randn(c, hkv, d)) for c in ctx_lens]
    contexts[1][0][:8], contexts[1][1][:8] = contexts[0][0][:8], contexts[0][1][:8]  # a shared prefix
    ids = list(range(1, 20))
    rng.shuffle(ids)
    k_cache, v_cache = torch.randn(20, block_size, hkv, d), torch.randn(20, block_size, hkv, d)
    tables = torch.zeros(4, 4, dtype=torch.int32)
    for s, (keys, values) in enumerate(contexts):
        for j in range(-(-len(keys) // block_size)):
            block = tables[0, j].item() if s == 1 and j < 2 else ids.pop()  # sequence 1 shares 0's two blocks
            tables[s, j] = block
            rows = slice(j * block_size, min((j + 1) * block_size, len(keys)))
            n = rows.stop - rows.start
            k_cache[block, :n], v_cache[block, :n] = keys[rows], values[rows]
    q = torch.randn(sum(q_lens), hq, d)
    query_start_loc = torch.tensor([0, 1, 6, 15, 16], dtype=torch.int32)
    out = kernels.paged_attention(q, k_cache, v_cache, query_start_loc, torch.tensor(ctx_lens, dtype=torch.int32),
                                  tables, d**-0.5)
    for s, (keys, values) in enumerate(contexts):
        a, b = query_start_loc[s].item(), query_start_loc[s + 1].item()
        keys, values = keys.double().repeat_interleave(3, 1), values.double().repeat_interleave(3, 1)
        scores = torch.einsum("nhd,lhd->hnl", q[a:b].double(), keys) * d**-0.5
        query_pos = torch.arange(ctx_lens[s] - (b - a), ctx_lens[s])
        scores.masked_fill_(torch.arange(ctx_lens[s])[None, None, :] > query_pos[None, :, None], float("-inf"))
        expected = torch.einsum("hnl,lhd->nhd", scores.softmax(-1), values)
        torch.testing.assert_close(out[a:b].double(), expected, atol=1e-5, rtol=1e-5)


def test_reachable_variants_hold_every_launch_choice_a_configuration_can_make() -> None:
    """Start-up warms ``reachable_*``: every choice the launchers can make for a step of this configuration
    must be in it, or that step would compile while serving."""
    from tpserve.executor.cuda_graphs import GraphPicker, graph_keys
    from tpserve.kernels.variants import (
        SINGLE,
        KernelConfig,
        decode_variants,
        reachable_eager,
        reachable_graphed,
    )

    cfg = KernelConfig(num_q_heads=8, num_kv_heads=2, block_size=16, max_batch_size=24, max_num_tokens=300,
                       max_blocks_per_seq=70, num_sms=132)
    eager = reachable_eager(cfg)
    for s in range(1, cfg.max_batch_size + 1):  # decodes, alone or first in a mixed step, any table width
        for width in range(1, cfg.max_blocks_per_seq + 1):
            splits = policy.num_kv_splits(s, cfg.num_kv_heads, width * cfg.block_size, cfg.num_sms)
            assert decode_variants(splits) <= eager, (s, width, splits)
    for t in range(2, cfg.max_num_tokens + 1):  # prompt steps (or their part after the decodes)
        for s in range(1, min(t - 1, cfg.max_batch_size) + 1):
            assert ("varlen", policy.varlen_block_m(t, s, cfg.group_pad)) in eager, (t, s)
    assert {k for k, _ in eager} == {"decode", "reduce", "varlen", "qk_norm_rope_store", "rms_norm",
                                     "add_rmsnorm", "silu_and_mul", "sample"}

    keys = graph_keys(cfg.max_batch_size, cfg.max_num_tokens)
    graphed = reachable_graphed(cfg, keys)
    pick = GraphPicker(keys)
    used = set()
    for t in range(1, cfg.max_num_tokens + 1):  # with graphs every step replays one: its choices
        for s in range(1, min(t, cfg.max_batch_size) + 1):
            key = pick(t, s)
            if key.decode:
                choice = decode_variants(cfg.decode_splits(key.seqs, cfg.max_blocks_per_seq))
            else:  # the decode kernel takes the leading decodes, the varlen kernel the rest
                choice = {("mixed_varlen", policy.varlen_block_m(key.tokens, key.seqs, cfg.group_pad))}
                choice |= decode_variants(cfg.decode_splits(key.seqs, cfg.max_blocks_per_seq), "mixed_")
            assert choice <= graphed, (t, s, key)
            used |= choice
    assert graphed - used <= set(SINGLE), "start-up would compile variants no step uses"


def test_a_sampling_kernel_that_does_not_compile_leaves_sampling_to_the_reference(monkeypatch):
    """warm_up's fallback: once use_torch_sampler is called (the kernel raised a compile error at start-up),
    the sampler takes the torch reference even where every other kernel is Triton, and the user is told."""
    monkeypatch.setattr(policy, "backend_for", lambda x: "triton")
    monkeypatch.setenv(policy.TORCH_SAMPLER_ENV, "0")  # restored after the test, whatever the call sets
    x = torch.zeros(1)
    assert policy.sampler_backend(x) == "triton"
    warning = policy.use_torch_sampler("OutOfResources: shared memory")
    assert policy.sampler_backend(x) == "torch" and policy.backend_for(x) == "triton"
    assert "OutOfResources: shared memory" in warning and "torch reference" in warning

"""Plain-torch versions of every kernel: what runs on CPU, and the math the Triton kernels must reproduce.

The rounding steps follow tpserve.model.llama operation by operation (RMSNorm in float32 cast back before
the weight multiply, RoPE with cos/sin cast to the activation dtype, SiLU in float32 then the multiply), so
a bf16 model gives the same values through either path; tests/test_kernel_dispatch.py checks that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def build_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int) -> torch.Tensor:
    """float32 [max_positions, head_dim]: cos of every position's angles in the first half, sin in the second.

    The angles are positions.float() * inv_freq, the same float32 product the model's RotaryEmbedding takes.
    """
    positions = torch.arange(max_positions, device=inv_freq.device)
    freqs = positions[:, None].float() * inv_freq
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x): the residual add and the next norm of a decoder layer."""
    new_residual = residual + x
    return rms_norm(new_residual, weight, eps), new_residual


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] -> [..., I]: silu(gate) * up, gate being the first half."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by position, rotate-half layout (dimension i paired with i + D/2)."""
    half = x.shape[-1] // 2
    cos_sin = cos_sin_cache.index_select(0, positions.long())
    cos = cos_sin[:, None, :half].repeat(1, 1, 2).to(x.dtype)
    sin = cos_sin[:, None, half:].repeat(1, 1, 2).to(x.dtype)
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Writes k, v [T, Hkv, D] into the caches [num_blocks, block_size, Hkv, D] at slot = block * block_size +
    offset (padding rows go to reserved block 0, so no row needs a branch)."""
    slots = slot_mapping.long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


def qk_norm_rope_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Per-head RMSNorm of q and k (Qwen3; skipped where the weight is None), RoPE on both, k and v stored
    into the caches; returns the rotated q [T, Hq, D]."""
    if q_norm_weight is not None:
        q = rms_norm(q, q_norm_weight, eps)
    if k_norm_weight is not None:
        k = rms_norm(k, k_norm_weight, eps)
    q, k = rope(q, positions, cos_sin_cache), rope(k, positions, cos_sin_cache)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    return q


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries to its whole context, read through its block table.

    Query i of sequence s sits at position seq_lens[s] - q_len[s] + i. One SDPA per sequence: this is the CPU
    path and an oracle, not a fast path (it reads the lengths to the host).
    """
    out = torch.zeros_like(q)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    block_size = k_cache.shape[1]
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for s, ctx in enumerate(lens):
        a, b = starts[s], starts[s + 1]
        if b == a or ctx == 0:
            continue
        blocks = block_tables[s, : -(-ctx // block_size)].long()
        keys = k_cache.index_select(0, blocks).reshape(-1, num_kv_heads, head_dim)[:ctx]
        values = v_cache.index_select(0, blocks).reshape(-1, num_kv_heads, head_dim)[:ctx]
        query_pos = torch.arange(ctx - (b - a), ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= query_pos[:, None]
        seq_out = F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1)[None],
            keys.transpose(0, 1)[None],
            values.transpose(0, 1)[None],
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        out[a:b] = seq_out[0].transpose(0, 1)
    return out

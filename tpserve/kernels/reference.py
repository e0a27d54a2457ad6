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
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    padded: bool = False,
) -> torch.Tensor:
    """The oracle: q [T, Hq, D] -> [T, Hq, D], every sequence in one padded scaled_dot_product_attention.

    Queries are scattered into [S, max_query_len] rows and keys gathered through the block tables into
    [S, max_seq_len]; the mask allows key j to query i of sequence s iff j <= its position. Its memory grows
    with S * max_query_len * max_seq_len: the engine calls it once for the decodes and once for the prefills.
    The two maxima are host sizes; when not given they are read from the device (a sync: tests only).
    ``padded``: a CUDA graph's bucketed layout, where tokens past ``query_start_loc[-1]`` belong to no
    sequence (their rows come out zero) and sequences may have no query (read from the device: a sync)."""
    if padded:
        real = int(query_start_loc[-1])
        out = torch.zeros_like(q)
        if real:
            qlens = (query_start_loc[1:] - query_start_loc[:-1]).long()
            keep = torch.nonzero(qlens).flatten()
            qsl = torch.zeros(len(keep) + 1, dtype=query_start_loc.dtype, device=q.device)
            qsl[1:] = torch.cumsum(qlens[keep], 0)
            out[:real] = paged_attention(q[:real], k_cache, v_cache, qsl, seq_lens[keep], block_tables[keep], scale)
        return out
    s = seq_lens.shape[0]
    t, hq, d = q.shape
    block_size = k_cache.shape[1]
    qsl, lens = query_start_loc.long(), seq_lens.long()
    qlens = qsl[1:] - qsl[:-1]
    if max_query_len is None:
        max_query_len = int(qlens.max())
    if max_seq_len is None:
        max_seq_len = int(lens.max())
    seq_of_token = torch.repeat_interleave(torch.arange(s, device=q.device), qlens, output_size=t)
    row = torch.arange(t, device=q.device) - qsl[:-1][seq_of_token]
    padded_q = q.new_zeros(s, max_query_len, hq, d)
    padded_q[seq_of_token, row] = q
    nblocks = -(-max_seq_len // block_size)
    tables = block_tables[:, :nblocks].long()
    keys = k_cache[tables].flatten(1, 2)[:, :max_seq_len]  # [S, L, Hkv, D]
    values = v_cache[tables].flatten(1, 2)[:, :max_seq_len]
    query_pos = (lens - qlens)[:, None] + torch.arange(max_query_len, device=q.device)[None, :]  # [S, Q]
    key_pos = torch.arange(max_seq_len, device=q.device)
    mask = key_pos[None, None, :] <= query_pos[:, :, None]  # [S, Q, L]; padding rows see their past too
    out = F.scaled_dot_product_attention(
        padded_q.transpose(1, 2).to(keys.dtype), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=mask[:, None], scale=scale, enable_gqa=True,
    )  # [S, Hq, Q, D]
    return out.transpose(1, 2)[seq_of_token, row].to(q.dtype)



"""Triton kernels for the small per-token ops: KV store, q/k norm + RoPE + KV store, add + RMSNorm, SiLU-and-mul.

Imported only when a CUDA tensor asks for them (tpserve.kernels dispatches), so tpserve never needs triton.
Each kernel rounds where the torch reference (tpserve.kernels.reference) rounds, so that bf16 outputs agree
with the eager model up to float32 reduction order. They launch with enable_fp_fusion=False: otherwise
Triton turns "round(a*b) - round(c*d)" into one bf16 fma (seen in the sm_90 PTX), skipping a rounding the
model does, and about 20% of RoPE outputs came out one step off. Launchers read shapes and strides only: no
host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tpserve.kernels.policy import next_power_of_2


@triton.jit
def _store_row(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, t, blk, off,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cs, stride_ch,
    NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    mask = (heads < NUM_KV_HEADS)[:, None]
    cache_off = blk * stride_cb + off * stride_cs + heads[:, None] * stride_ch + dims[None, :]
    k = tl.load(k_ptr + t * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    tl.store(k_cache_ptr + cache_off, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    tl.store(v_cache_ptr + cache_off, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize_on_alignment=["slot_ptr"])
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cs, stride_ch,
    BLOCK_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    _store_row(
        k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, t, slot // BLOCK_SIZE, slot % BLOCK_SIZE,
        stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cs, stride_ch,
        NUM_KV_HEADS, HEADS_PAD, HEAD_DIM,
    )


def _check_caches(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need one shape and one layout, head_dim contiguous")


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    _check_caches(k_cache, v_cache)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1], NUM_KV_HEADS=num_kv_heads, HEADS_PAD=next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
    )


@triton.jit
def _norm_rope(
    x_ptr, heads_mask, w_ptr, cos, sin, eps,
    HAS_NORM: tl.constexpr, HEAD_DIM: tl.constexpr, DTYPE: tl.constexpr,
):
    """Loads x [HEADS_PAD, HEAD_DIM] as two halves (x_ptr points at each head's first element), applies the
    optional per-head RMSNorm then rotate-half RoPE with the reference's bf16/fp16 rounding steps."""
    HALF: tl.constexpr = HEAD_DIM // 2
    half = tl.arange(0, HALF)
    x1 = tl.load(x_ptr + half[None, :], mask=heads_mask).to(tl.float32)
    x2 = tl.load(x_ptr + HALF + half[None, :], mask=heads_mask).to(tl.float32)
    if HAS_NORM:
        var = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM
        rstd = tl.math.rsqrt(var + eps)[:, None]
        w1 = tl.load(w_ptr + half).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + half).to(tl.float32)[None, :]
        x1 = (w1 * (x1 * rstd).to(DTYPE).to(tl.float32)).to(DTYPE).to(tl.float32)
        x2 = (w2 * (x2 * rstd).to(DTYPE).to(tl.float32)).to(DTYPE).to(tl.float32)
    o1 = (x1 * cos).to(DTYPE).to(tl.float32) - (x2 * sin).to(DTYPE).to(tl.float32)
    o2 = (x2 * cos).to(DTYPE).to(tl.float32) + (x1 * sin).to(DTYPE).to(tl.float32)
    return o1.to(DTYPE), o2.to(DTYPE)


@triton.jit(do_not_specialize_on_alignment=["pos_ptr", "slot_ptr"])
def _qk_norm_rope_store_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_sin_ptr, qw_ptr, kw_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, eps,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_pos,
    stride_cb, stride_cs, stride_ch,
    NUM_Q_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr, NUM_KV_HEADS: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_Q_NORM: tl.constexpr, HAS_K_NORM: tl.constexpr,
):
    t = tl.program_id(0)
    DTYPE = q_out_ptr.dtype.element_ty
    HALF: tl.constexpr = HEAD_DIM // 2
    half = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cos_sin_ptr + pos * stride_pos + half).to(DTYPE).to(tl.float32)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_pos + HALF + half).to(DTYPE).to(tl.float32)[None, :]

    qh = tl.arange(0, Q_HEADS_PAD)
    q_mask = (qh < NUM_Q_HEADS)[:, None]
    q1, q2 = _norm_rope(q_ptr + t * stride_qt + qh[:, None] * stride_qh, q_mask, qw_ptr, cos, sin, eps,
                        HAS_Q_NORM, HEAD_DIM, DTYPE)
    out = q_out_ptr + t * stride_ot + qh[:, None] * stride_oh + half[None, :]
    tl.store(out, q1, mask=q_mask)
    tl.store(out + HALF, q2, mask=q_mask)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    kh = tl.arange(0, KV_HEADS_PAD)
    k_mask = (kh < NUM_KV_HEADS)[:, None]
    k1, k2 = _norm_rope(k_ptr + t * stride_kt + kh[:, None] * stride_kh, k_mask, kw_ptr, cos, sin, eps,
                        HAS_K_NORM, HEAD_DIM, DTYPE)
    cache = blk * stride_cb + off * stride_cs + kh[:, None] * stride_ch + half[None, :]
    tl.store(k_cache_ptr + cache, k1.to(k_cache_ptr.dtype.element_ty), mask=k_mask)
    tl.store(k_cache_ptr + cache + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=k_mask)
    dims = tl.arange(0, HEAD_DIM)
    v = tl.load(v_ptr + t * stride_vt + kh[:, None] * stride_vh + dims[None, :], mask=k_mask)
    v_cache = blk * stride_cb + off * stride_cs + kh[:, None] * stride_ch + dims[None, :]
    tl.store(v_cache_ptr + v_cache, v.to(v_cache_ptr.dtype.element_ty), mask=k_mask)


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
    _check_caches(k_cache, v_cache)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    for name, x in (("q", q), ("k", k), ("v", v), ("cos_sin_cache", cos_sin_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dimension")
    q_out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    _qk_norm_rope_store_kernel[(num_tokens,)](
        q, k, v, positions, cos_sin_cache,
        q_norm_weight if q_norm_weight is not None else q, k_norm_weight if k_norm_weight is not None else k,
        q_out, k_cache, v_cache, slot_mapping, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), q_out.stride(0),
        q_out.stride(1), cos_sin_cache.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_Q_HEADS=num_q_heads, Q_HEADS_PAD=next_power_of_2(num_q_heads), NUM_KV_HEADS=num_kv_heads,
        KV_HEADS_PAD=next_power_of_2(num_kv_heads), HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        HAS_Q_NORM=q_norm_weight is not None, HAS_K_NORM=k_norm_weight is not None, enable_fp_fusion=False,
    )
    return q_out


@triton.jit
def _rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps, n_cols,
    stride_x, stride_res, stride_out, stride_res_out,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    DTYPE = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(DTYPE)
        tl.store(res_out_ptr + row * stride_res_out + cols, h, mask=mask)
        x = h.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = w * (x * rstd).to(DTYPE).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, y.to(DTYPE), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last] without a copy when it can be viewed so; the kernels need a unit last stride."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _rmsnorm_kernel[(x2.shape[0],)](
            x2, x2, weight, out, out, eps, x2.shape[1], x2.stride(0), x2.stride(0), out.stride(0), out.stride(0),
            HAS_RESIDUAL=False, BLOCK=next_power_of_2(x2.shape[1]), enable_fp_fusion=False,
        )
    return out.view(x.shape)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    x2, r2 = _rows(x), _rows(residual)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _rmsnorm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, res_out, eps, x2.shape[1], x2.stride(0), r2.stride(0), out.stride(0),
            res_out.stride(0), HAS_RESIDUAL=True, BLOCK=next_power_of_2(x2.shape[1]), enable_fp_fusion=False,
        )
    return out.view(x.shape), res_out.view(x.shape)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    DTYPE = out_ptr.dtype.element_ty
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(DTYPE).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(DTYPE), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    x2 = _rows(gate_up)
    n_cols = x2.shape[1] // 2
    out = torch.empty((x2.shape[0], n_cols), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, next_power_of_2(n_cols))
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n_cols, block))](
            x2, out, n_cols, x2.stride(0), out.stride(0), BLOCK=block, enable_fp_fusion=False
        )
    return out.view(*gate_up.shape[:-1], n_cols)

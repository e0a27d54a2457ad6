"""The GPU kernels the model calls, each dispatched to Triton on CUDA and to a plain-torch reference elsewhere.

Importing this package never imports triton: the Triton modules (attention, fused) load on the first call
with a CUDA tensor, and only when triton imports and TPSERVE_DISABLE_TRITON is not 1 (policy.backend_for).
"""

from __future__ import annotations

import torch

from tpserve.kernels import reference
from tpserve.kernels.policy import backend_for, sampler_backend
from tpserve.kernels.reference import build_cos_sin_cache

__all__ = [
    "add_rmsnorm",
    "build_cos_sin_cache",
    "paged_attention",
    "qk_norm_rope_store",
    "rms_norm",
    "sample",
    "silu_and_mul",
    "store_kv",
]


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Writes k, v [T, Hkv, D] into the caches [num_blocks, block_size, Hkv, D] at slot_mapping [T] int32."""
    if backend_for(k) == "triton":
        from tpserve.kernels import fused

        fused.store_kv(k, v, k_cache, v_cache, slot_mapping)
    else:
        reference.store_kv(k, v, k_cache, v_cache, slot_mapping)


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
    """Optional per-head q/k RMSNorm (Qwen3), rotate-half RoPE from cos_sin_cache (build_cos_sin_cache),
    k and v stored by slot_mapping; returns the rotated q [T, Hq, D]. q, k, v may be strided views of the
    fused qkv output (last dimension contiguous)."""
    args = (q, k, v, positions, cos_sin_cache, q_norm_weight, k_norm_weight, eps, k_cache, v_cache, slot_mapping)
    if backend_for(q) == "triton":
        from tpserve.kernels import fused

        return fused.qk_norm_rope_store(*args)
    return reference.qk_norm_rope_store(*args)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    num_decodes: int = 0,
    padded: bool = False,
    decodes_on_device: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] over the paged caches -> [T, Hq, D]. On CUDA: the split-KV decode
    kernel when T == S, else the varlen kernel (with the first num_decodes single-query sequences, a host
    count, sent to the decode kernel); with ``padded`` (a CUDA graph's bucket: tokens past the last
    sequence's, sequences with no query) the decode kernel for the first ``decodes_on_device`` sequences and
    the varlen kernel for the rest, zeros for the padding tokens; graph-capturable. Elsewhere: the batched
    torch oracle."""
    args = (q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale)
    if backend_for(q) == "triton":
        from tpserve.kernels import attention

        return attention.paged_attention(*args, num_decodes=num_decodes, padded=padded,
                                         decodes_on_device=decodes_on_device)
    return reference.paged_attention(*args, padded=padded)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if backend_for(x) == "triton":
        from tpserve.kernels import fused

        return fused.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(residual + x), residual + x), new tensors; the sum is rounded to x's dtype first,
    as the model's `x = x + sublayer(x)` does."""
    if backend_for(x) == "triton":
        from tpserve.kernels import fused

        return fused.add_rmsnorm(x, residual, weight, eps)
    return reference.add_rmsnorm(x, residual, weight, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] -> [..., I]: silu(first half) * second half."""
    if backend_for(gate_up) == "triton":
        from tpserve.kernels import fused

        return fused.silu_and_mul(gate_up)
    return reference.silu_and_mul(gate_up)


def sample(logits: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """int64 [n] tokens of logits [n, V] under the packed per-row params int32 [n, reference.SAMPLE_PARAMS]:
    greedy rows the argmax, random rows a Gumbel-max draw from what temperature, min_p, top-k and top-p keep."""
    if sampler_backend(logits) == "triton":
        from tpserve.kernels import sampling

        return sampling.sample(logits, params)
    return reference.sample(logits, params)

"""Triton attention over the paged KV cache: a varlen causal kernel and a split-KV decode kernel.

Layout (the paged-KV contract): caches [num_blocks, block_size, num_kv_heads, head_dim]; q [T, Hq, D] with the
new tokens of S sequences concatenated; query_start_loc int32 [S+1]; seq_lens int32 [S] (context after this
step); block_tables int32 [S, max_blocks_per_seq]. Query i of sequence s sits at position
seq_lens[s] - q_len[s] + i and attends to keys 0..that position.

One program handles one kv head and all the query heads of its GQA group, so each key tile is read once per
group. Grids come from static shapes only (T, S, heads, a fixed number of splits): the launchers never read
a device tensor, so they run inside CUDA graph capture and never sync.

Triton compiles one variant per combination of constexprs and of the integer and alignment facts it
specializes on. The arguments that vary from step to step (the sequence count, the block-table width, the
metadata pointers, which are views into one packed copy) are kept out of that specialization, so the
variants a configuration can reach are the constexpr choices of policy.py alone, and start-up compiles
each (tpserve.kernels.variants).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tpserve.kernels.policy import (
    DECODE_BLOCK_N,
    attention_path,
    next_power_of_2,
    num_kv_splits,
    num_sms,
    varlen_block_m,
)

_LOG2E = 1.4426950408889634


@triton.jit
def _find_seq(query_start_loc_ptr, pid, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence s whose query blocks hold program pid: the last s with start[s] // BLOCK_Q + s <= pid."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _load_tile(cache_ptr, block_table_row, keys, key_mask, kv_head, dims,
               stride_cb, stride_cs, stride_ch, BLOCK_SIZE: tl.constexpr):
    """Keys (or values) [BLOCK_N, HEAD_DIM] at logical positions keys, gathered through the block table."""
    blk = tl.load(block_table_row + keys // BLOCK_SIZE, mask=key_mask, other=0).to(tl.int64)
    rows = blk * stride_cb + (keys % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
    return tl.load(cache_ptr + rows[:, None] + dims[None, :], mask=key_mask[:, None], other=0.0)


@triton.jit(do_not_specialize=["num_seqs", "stride_bt"],
            do_not_specialize_on_alignment=["block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr",
                                            "num_decodes_ptr"])
def _varlen_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, out_ptr, num_decodes_ptr,
    scale_log2, num_seqs, group,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_bt,
    GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, SKIP_DECODES: tl.constexpr,
):
    """SKIP_DECODES: the first *num_decodes_ptr sequences are the decode kernel's (a graphed mixed step)."""
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    s = _find_seq(query_start_loc_ptr, pid, num_seqs, BLOCK_Q)
    if SKIP_DECODES:
        if s < tl.load(num_decodes_ptr):
            return
    q_start = tl.load(query_start_loc_ptr + s)
    q_len = tl.load(query_start_loc_ptr + s + 1) - q_start
    q_block = pid - (q_start // BLOCK_Q + s)
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + s)
    context_start = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_tok = q_block * BLOCK_Q + rows // GROUP_PAD
    g = rows % GROUP_PAD
    row_mask = (q_tok < q_len) & (g < group)
    head = kv_head * group + g
    dims = tl.arange(0, HEAD_DIM)
    token = (q_start + q_tok).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_mask[:, None], other=0.0)
    q_pos = context_start + q_tok

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    kv_end = context_start + (q_block + 1) * BLOCK_Q  # one past the block's last query position
    if kv_end > seq_len:  # (a scalar if rather than tl.minimum keeps the interpreter's loop bound a scalar)
        kv_end = seq_len
    bt_row = block_tables_ptr + s.to(tl.int64) * stride_bt
    for start in range(0, kv_end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_mask = keys < kv_end
        k = _load_tile(k_cache_ptr, bt_row, keys, key_mask, kv_head, dims, stride_cb, stride_cs, stride_ch,
                       BLOCK_SIZE)
        v = _load_tile(v_cache_ptr, bt_row, keys, key_mask, kv_head, dims, stride_cb, stride_cs, stride_ch,
                       BLOCK_SIZE)
        scores = tl.dot(q, tl.trans(k)) * scale_log2
        visible = key_mask[None, :] & (keys[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


@triton.jit(do_not_specialize=["stride_bt"],
            do_not_specialize_on_alignment=["block_tables_ptr", "seq_lens_ptr", "num_decodes_ptr"])
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    num_decodes_ptr, scale_log2, num_q_heads, group,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_bt,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, ONLY_DECODES: tl.constexpr,
):
    """One query per sequence; program (s, kv head, split) covers a contiguous run of key tiles of the split's
    share and writes a partial (normalized output, log2-sum-exp) that _reduce_kernel combines; with one
    split it writes the output directly. ONLY_DECODES: sequences from *num_decodes_ptr on are not decodes
    (a graphed mixed step: the varlen kernel's), and query row s is sequence s's (decodes come first)."""
    s = tl.program_id(0).to(tl.int64)
    if ONLY_DECODES:
        if s >= tl.load(num_decodes_ptr):
            return
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + s)
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tile_lo + tiles_per_split
    if tile_hi > num_tiles:
        tile_hi = num_tiles

    g = tl.arange(0, BLOCK_H)
    head_mask = g < group
    head = kv_head * group + g
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + s * stride_qt + head[:, None] * stride_qh + dims[None, :], mask=head_mask[:, None],
                other=0.0)
    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    bt_row = block_tables_ptr + s * stride_bt
    for tile in range(tile_lo, tile_hi):
        keys = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        key_mask = keys < seq_len
        k = _load_tile(k_cache_ptr, bt_row, keys, key_mask, kv_head, dims, stride_cb, stride_cs, stride_ch,
                       BLOCK_SIZE)
        v = _load_tile(v_cache_ptr, bt_row, keys, key_mask, kv_head, dims, stride_cb, stride_cs, stride_ch,
                       BLOCK_SIZE)
        scores = tl.dot(q, tl.trans(k)) * scale_log2
        scores = tl.where(key_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + s * stride_ot + head[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])
    else:
        part = (s * num_q_heads + head) * NUM_SPLITS + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], out, mask=head_mask[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(l_i), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=head_mask)


@triton.jit(do_not_specialize_on_alignment=["num_decodes_ptr"])
def _reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_decodes_ptr, stride_ot, stride_oh, num_q_heads,
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, ONLY_DECODES: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    if ONLY_DECODES:
        if s >= tl.load(num_decodes_ptr):
            return
    head = tl.program_id(1)
    base = (s * num_q_heads + head) * NUM_SPLITS
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM)
    lse = tl.load(part_lse_ptr + base + splits)
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # an empty context: every split empty, the output is 0
    w = tl.exp2(lse - m)
    den = tl.sum(w, axis=0)
    parts = tl.load(part_out_ptr + (base + splits)[:, None] * HEAD_DIM + dims[None, :])
    out = tl.sum(parts * w[:, None], axis=0) / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + s * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


def _num_warps(head_dim: int) -> int:
    """8 warps at head_dim 128: with 4, ptxas spills the [64, 128] tiles to the stack (checked for sm_90)."""
    return 8 if head_dim >= 128 else 4


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int]:
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("caches need one layout; q and the caches need a contiguous head_dim")
    if num_q_heads % num_kv_heads or head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"unsupported heads {num_q_heads}/{num_kv_heads} or head_dim {head_dim}")
    return num_q_heads // num_kv_heads, num_kv_heads


def varlen_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    num_decodes: torch.Tensor | None = None,
) -> torch.Tensor:
    """block_m (query rows per program) defaults to policy.varlen_block_m for these shapes. num_decodes (int32
    [1] on the device): the first that many sequences are left to the decode kernel."""
    group, num_kv_heads = _check(q, k_cache, v_cache)
    num_tokens, num_seqs = q.shape[0], seq_lens.shape[0]
    out = torch.empty_like(q) if out is None else out
    if num_tokens == 0:
        return out
    group_pad = next_power_of_2(group)
    block_m = block_m or varlen_block_m(num_tokens, num_seqs, group_pad)
    block_q = block_m // group_pad
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _varlen_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
        num_decodes if num_decodes is not None else seq_lens, scale * _LOG2E, num_seqs, group,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0),
        GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=64,
        HEAD_DIM=q.shape[2], BLOCK_SIZE=k_cache.shape[1], SKIP_DECODES=num_decodes is not None,
        num_warps=_num_warps(q.shape[2]),
    )
    return out


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    num_decodes: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [S, Hq, D], one query per sequence at position seq_lens[s] - 1. num_splits (a power of two) defaults
    to policy.num_kv_splits for this machine and these shapes. num_decodes (int32 [1] on the device): only
    the first that many of the S = len(seq_lens) sequences are decodes, their queries q's first rows (the
    rest of q belongs to the varlen kernel)."""
    group, num_kv_heads = _check(q, k_cache, v_cache)
    num_seqs = seq_lens.shape[0]
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    out = torch.empty_like(q) if out is None else out
    if num_seqs == 0:
        return out
    if num_splits is None:
        sms = num_sms(q.device.index or 0) if q.is_cuda else 1
        num_splits = num_kv_splits(num_seqs, num_kv_heads, block_tables.shape[1] * k_cache.shape[1], sms)
    part_out = part_lse = out  # unused with one split
    if num_splits > 1:
        part_out = torch.empty((num_seqs, num_q_heads, num_splits, head_dim), dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty((num_seqs, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
    only_decodes = num_decodes is not None
    nd = num_decodes if only_decodes else seq_lens  # an unread pointer when every sequence is a decode
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse, nd, scale * _LOG2E, num_q_heads,
        group, q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0),
        BLOCK_H=max(16, next_power_of_2(group)), BLOCK_N=DECODE_BLOCK_N, HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1], NUM_SPLITS=num_splits, ONLY_DECODES=only_decodes,
        num_warps=_num_warps(head_dim),
    )
    if num_splits > 1:
        _reduce_kernel[(num_seqs, num_q_heads)](
            part_out, part_lse, out, nd, out.stride(0), out.stride(1), num_q_heads,
            NUM_SPLITS=num_splits, HEAD_DIM=head_dim, ONLY_DECODES=only_decodes, num_warps=4,
        )
    return out


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
    """The decode kernel when every sequence brings one query (T == S, a shape fact), else the varlen one.

    num_decodes > 0 says that the first num_decodes sequences bring one query each (decodes first, as the
    scheduler orders a mixed step): they go to the split-KV decode kernel, the rest to the varlen kernel,
    instead of one varlen program walking each decode's whole context alone.

    padded: a CUDA graph's step, whose T and S are its bucket's (AttentionMetadata.padded): sequences past the
    real ones have no query, and the rows of the tokens past the real ones, which no program writes, are
    zeros. The decode count is on the device (``decodes_on_device``, int32 [1]): both kernels launch over
    the whole bucket and each leaves the other's sequences alone, so one graph serves any mix."""
    num_tokens, num_seqs = q.shape[0], seq_lens.shape[0]
    if padded:
        out = torch.zeros_like(q)
        if decodes_on_device is not None:
            decode_attention(q, k_cache, v_cache, seq_lens, block_tables, scale, out=out,
                             num_decodes=decodes_on_device)
        return varlen_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, out=out,
                                num_decodes=decodes_on_device)
    if attention_path(num_tokens, num_seqs) == "decode":
        return decode_attention(q, k_cache, v_cache, seq_lens, block_tables, scale)
    if not 0 < num_decodes < num_seqs:
        return varlen_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale)
    out = torch.empty_like(q)
    nd = num_decodes
    decode_attention(q[:nd], k_cache, v_cache, seq_lens[:nd], block_tables[:nd], scale, out=out[:nd])
    varlen_attention(q[nd:], k_cache, v_cache, query_start_loc[nd:] - nd, seq_lens[nd:], block_tables[nd:], scale,
                     out=out[nd:])
    return out

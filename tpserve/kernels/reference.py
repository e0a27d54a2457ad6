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




# -- sampling -----------------------------------------------------------------------------------------------
# The per-row parameters of a sampling step: one int32 row per sampled row, so one host-to-device copy.
SAMPLE_GREEDY, SAMPLE_TOP_K, SAMPLE_SEED_LO, SAMPLE_SEED_HI, SAMPLE_OFFSET = 0, 1, 2, 3, 4
SAMPLE_INV_TEMP, SAMPLE_TOP_P, SAMPLE_MIN_P = 5, 6, 7  # float32 bit patterns
SAMPLE_PARAMS = 8

# Gumbel noise from a uniform in [2^-24, 1 - 2^-24] lies in [-2.82, 16.64]: a token more than 19.5 below the row's
# maximum can never beat the maximum, which is always kept. Every threshold is clamped to max - FLOOR_GAP, so
# the searches and the noise never look further down; 40 rather than 20 so that what lies below (at most
# V * e^-40 of the maximum's mass) changes no float32 sum of top-p's.
FLOOR_GAP = 40.0

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * b for a 32-bit constant and int64 tensors of 32-bit values, by 16-bit
    halves of b so that no product leaves int64."""
    bl, bh = b & 0xFFFF, b >> 16
    p0, p1 = a * bl, a * bh  # each < 2^48
    lo = (p0 + ((p1 & 0xFFFF) << 16)) & _MASK32
    hi = (p1 + (p0 >> 16)) >> 16
    return hi, lo


def philox4x32(c0: torch.Tensor, c1: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor,
               rounds: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 (Salmon et al., Random123; Triton's ``tl.philox``) of the counter (c0, c1, 0, 0) under the
    key (k0, k1): its four words. All int64 tensors holding 32-bit values (broadcast)."""
    zero = torch.zeros_like(c0 + c1 + k0 + k1)
    c0, c1, c2, c3 = c0 + zero, c1 + zero, zero, zero
    k0, k1 = k0 + zero, k1 + zero
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def _to_gumbel(bits: torch.Tensor) -> torch.Tensor:
    u = ((bits >> 9).float() + 0.5) * (2.0**-23)  # exact in float32, in (0, 1)
    return -torch.log(-torch.log(u))


def gumbel_noise(token: torch.Tensor, offset: torch.Tensor, seed_lo: torch.Tensor, seed_hi: torch.Tensor
                 ) -> torch.Tensor:
    """float32 Gumbel noise of token ids at a request's sample counter under its seed: a pure function of
    (seed, counter, token), so a row draws the same noise alone or in any batch, on every rank. Token v reads
    word v % 4 of Philox's counter (v // 4, counter): one Philox per four tokens. Arguments are int64 tensors
    (broadcast); seeds and counters are 32-bit patterns."""
    words = philox4x32(token >> 2, offset & _MASK32, seed_lo & _MASK32, seed_hi & _MASK32)
    lane = token & 3
    bits = torch.where(lane == 0, words[0], torch.where(lane == 1, words[1], torch.where(lane == 2, words[2],
                                                                                        words[3])))
    return _to_gumbel(bits)


def gumbel_rows(offset: torch.Tensor, seed_lo: torch.Tensor, seed_hi: torch.Tensor, vocab: int) -> torch.Tensor:
    """float32 [n, vocab]: gumbel_noise of every token of n rows (int64 [n] counters and seeds), four tokens
    per Philox evaluation."""
    groups = torch.arange((vocab + 3) // 4).view(1, -1)
    col = lambda t: (t & _MASK32).view(-1, 1)  # noqa: E731
    words = philox4x32(groups, col(offset), col(seed_lo), col(seed_hi))
    return _to_gumbel(torch.stack(words, dim=-1).flatten(1)[:, :vocab])


def sample(logits: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """int64 [n] tokens of logits [n, V] under the packed per-row ``params`` int32 [n, SAMPLE_PARAMS].

    Greedy rows take the argmax. A random row scales by its inverse temperature, keeps the tokens at or above
    one threshold, the highest of min_p's (max + log min_p), top-k's (the k-th largest value) and top-p's
    (the smallest set by value whose mass over what min_p and top-k kept exceeds top_p: each kept token's mass
    before it is at most top_p), and takes the argmax of value + Gumbel noise among them (Gumbel-max: a draw
    from the kept tokens' softmax). NaN counts as -inf and +inf as the largest float, so no row raises. The
    Triton kernel (tpserve.kernels.sampling) finds the same thresholds without sorting."""
    n, vocab = logits.shape
    floats = params[:, SAMPLE_INV_TEMP:].contiguous().view(torch.float32)
    inv_t, top_p, min_p = floats[:, 0:1], floats[:, 1:2], floats[:, 2:3]
    ints = params.long()
    top_k = ints[:, SAMPLE_TOP_K]
    x = logits.float() * inv_t
    x = torch.nan_to_num(x, nan=float("-inf"), posinf=torch.finfo(torch.float32).max, neginf=float("-inf"))
    tokens = torch.argmax(x, dim=-1)
    rows = (ints[:, SAMPLE_GREEDY] == 0).nonzero().flatten()
    if rows.numel() == 0:
        return tokens
    x, top_k, top_p, min_p = x[rows], top_k[rows], top_p[rows], min_p[rows]
    m = x.amax(dim=-1, keepdim=True)
    live = m > float("-inf")  # a row of -inf (or NaN) only: its argmax, 0
    m = torch.where(live, m, torch.zeros_like(m))
    threshold = torch.maximum(m - FLOOR_GAP, torch.where(min_p > 0, m + torch.log(min_p), float("-inf")))
    cut_k = (top_k < vocab).any()
    cut_p = (top_p < 1.0).any()
    if cut_k or cut_p:
        ordered = torch.sort(x, dim=-1, descending=True).values
        if cut_k:
            kth = ordered.gather(1, (top_k.clamp(1, vocab) - 1).view(-1, 1))
            threshold = torch.where(top_k.view(-1, 1) < vocab, torch.maximum(threshold, kth), threshold)
        if cut_p:
            mass = torch.where(ordered >= threshold, torch.exp(ordered - m), 0.0)
            total = mass.sum(dim=-1, keepdim=True)
            # The first token whose mass with all before it exceeds top_p of the total: the last one kept.
            over = torch.cumsum(mass, dim=-1) > top_p * total
            last = torch.where(over.any(dim=-1, keepdim=True), over.int().argmax(dim=-1, keepdim=True), vocab - 1)
            cut = torch.where(top_p < 1.0, ordered.gather(1, last), float("-inf"))
            threshold = torch.maximum(threshold, cut)
    keep = (x >= threshold) & live
    seeds = ints[rows]
    offset, seed_lo, seed_hi = seeds[:, SAMPLE_OFFSET], seeds[:, SAMPLE_SEED_LO], seeds[:, SAMPLE_SEED_HI]
    r, v = keep.nonzero(as_tuple=True)  # noise only where a token can win
    if 4 * r.numel() > keep.numel():  # most tokens: every row's noise, four tokens a Philox
        scores = torch.where(keep, x + gumbel_rows(offset, seed_lo, seed_hi, vocab), float("-inf"))
    else:
        scores = torch.full_like(x, float("-inf"))
        scores[r, v] = x[r, v] + gumbel_noise(v, offset[r], seed_lo[r], seed_hi[r])
    chosen = torch.where(live.flatten(), torch.argmax(scores, dim=-1), tokens[rows])
    return tokens.index_copy(0, rows, chosen)

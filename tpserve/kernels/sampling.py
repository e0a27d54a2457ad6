"""One Triton launch samples every row of a step: greedy, temperature, min_p, top-k, top-p and per-request seeds.

The math is tpserve.kernels.reference.sample's (each random row keeps the tokens at or above one threshold and
takes the argmax of value + Gumbel noise, the noise a Philox function of (seed, sample counter, token)); this
kernel finds the thresholds without sorting the vocabulary. One program per row:

1. a pass for the row's maximum m, its softmax mass z (online) and its argmax (the greedy rows stop here);
2. for top-k, then for top-p, a bracket search: every pass over the row counts N(t) and sums the mass M(t) of
   the tokens at or above the bracket's low end and three pivots inside it, and gathers the tokens inside the
   bracket into a CAP-long scratch row. Once at most CAP tokens lie inside, the gathered ones, sorted in
   registers, give the exact threshold (the k-th largest; the first token whose mass with all above it exceeds
   top_p of what min_p and top-k kept). Top-p's bracket starts at max + log(z (1 - top_p) / V): below it no
   token can be in the top-p set, so a peaked row needs one pass; a flat row narrows by 4x a pass;
3. the Gumbel argmax over the kept tokens: from the scratch row when the bracket held every kept token, else a
   pass over the row that skips every block with no token at or above the threshold (and their noise).

Every threshold is clamped to max - FLOOR_GAP (no token below can win: reference.FLOOR_GAP). Launchers read
shapes only: no host sync. Imported only when a CUDA tensor asks (tpserve.kernels.sample).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from tpserve.kernels.reference import (
    FLOOR_GAP,
    SAMPLE_GREEDY,
    SAMPLE_INV_TEMP,
    SAMPLE_MIN_P,
    SAMPLE_OFFSET,
    SAMPLE_PARAMS,
    SAMPLE_SEED_HI,
    SAMPLE_SEED_LO,
    SAMPLE_TOP_K,
    SAMPLE_TOP_P,
)

BLOCK = 2048  # logits per tile of a pass
CAP = 2048  # tokens a bracket may hold to be finished in registers (a power of 2: it is sorted)
NUM_WARPS = 8
MAX_PASSES = 12  # of one bracket search: 4^-12 of FLOOR_GAP is below float32 resolution there
FLT_MAX = 3.4028234663852886e38

if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter has no libdevice; numpy's log is exact anyway
    @triton.jit
    def _log(x):
        return tl.log(x)
else:
    @triton.jit
    def _log(x):
        """libdevice's correctly rounded log (tl.log is an approximation): the noise torch computes, bit for bit."""
        return libdevice.log(x)


@triton.jit
def _load_scaled(row_ptr, offs, V, inv_t):
    """A tile of the row times the inverse temperature, in float32; NaN -> -inf, +inf -> the largest float."""
    x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_t
    x = tl.where(x == x, x, float("-inf"))
    return tl.minimum(x, FLT_MAX)


@triton.jit
def _philox(c0, offset, k0, k1):
    """Philox4x32-10 of the counters (c0, offset, 0, 0) under the key (k0, k1): four uint32 words each."""
    zero = c0 * 0
    c1 = zero + offset
    c2 = zero
    c3 = zero
    key0 = zero + k0
    key1 = zero + k1
    for _ in tl.static_range(10):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ key0
        c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ key1
        c1 = _c2 * 0xCD9E8D57
        c3 = _c0 * 0xD2511F53
        key0 = key0 + 0x9E3779B9
        key1 = key1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _to_gumbel(bits):
    """The top 23 bits to a uniform in (0, 1), then -log(-log(u)) with an exact log."""
    u = ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    return -_log(-_log(u))


@triton.jit
def _gumbel(tok, offset, k0, k1):
    """reference.gumbel_noise of any token ids: word tok % 4 of Philox of the counter (tok // 4, offset)."""
    c0, c1, c2, c3 = _philox((tok >> 2).to(tl.uint32, bitcast=True), offset, k0, k1)
    lane = tok & 3
    return _to_gumbel(tl.where(lane == 0, c0, tl.where(lane == 1, c1, tl.where(lane == 2, c2, c3))))


@triton.jit
def _gumbel_tile(start, offset, k0, k1, BLOCK: tl.constexpr):
    """The noise of tokens start .. start + BLOCK (start a multiple of 4): one Philox per four tokens, its
    words interleaved back into token order."""
    groups = (start // 4 + tl.arange(0, BLOCK // 4)).to(tl.uint32, bitcast=True)
    c0, c1, c2, c3 = _philox(groups, offset, k0, k1)
    words = tl.join(tl.join(c0, c2), tl.join(c1, c3))  # [g, i, j] = word 2i + j of group g
    return _to_gumbel(tl.reshape(words, (BLOCK,)))


@triton.jit
def _bracket_pass(row_ptr, V, inv_t, m, lo, hi, buf_v, buf_i, BLOCK: tl.constexpr, CAP: tl.constexpr):
    """One pass: N and M (mass relative to exp(m)) at lo and at three pivots in (lo, min(hi, m)), and the
    tokens in [lo, hi) gathered into the scratch row (the first CAP of them) with their count."""
    top = tl.minimum(hi, m)
    q1 = lo + (top - lo) * 0.25
    q2 = lo + (top - lo) * 0.5
    q3 = lo + (top - lo) * 0.75
    n0 = tl.zeros((), tl.int32)
    n1 = tl.zeros((), tl.int32)
    n2 = tl.zeros((), tl.int32)
    n3 = tl.zeros((), tl.int32)
    s0 = tl.zeros((), tl.float32)
    s1 = tl.zeros((), tl.float32)
    s2 = tl.zeros((), tl.float32)
    s3 = tl.zeros((), tl.float32)
    count = tl.zeros((), tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = _load_scaled(row_ptr, offs, V, inv_t)
        if tl.max(x, 0) >= lo:  # a tile wholly below the bracket adds nothing
            e = tl.exp(x - m)
            a0 = x >= lo
            a1 = x >= q1
            a2 = x >= q2
            a3 = x >= q3
            n0 += tl.sum(a0.to(tl.int32), 0)
            n1 += tl.sum(a1.to(tl.int32), 0)
            n2 += tl.sum(a2.to(tl.int32), 0)
            n3 += tl.sum(a3.to(tl.int32), 0)
            s0 += tl.sum(tl.where(a0, e, 0.0), 0)
            s1 += tl.sum(tl.where(a1, e, 0.0), 0)
            s2 += tl.sum(tl.where(a2, e, 0.0), 0)
            s3 += tl.sum(tl.where(a3, e, 0.0), 0)
            inside = a0 & (x < hi)
            pos = count + tl.cumsum(inside.to(tl.int32), 0) - 1
            keep = inside & (pos < CAP)
            tl.store(buf_v + pos, x, mask=keep)
            tl.store(buf_i + pos, offs.to(tl.float32), mask=keep)
            count += tl.sum(inside.to(tl.int32), 0)
    return q1, q2, q3, n0, n1, n2, n3, s0, s1, s2, s3, count


@triton.jit
def _search(row_ptr, V, inv_t, m, lo, goal_k, goal_mass, BY_MASS: tl.constexpr, buf_v, buf_i,
            BLOCK: tl.constexpr, CAP: tl.constexpr, MAX_PASSES: tl.constexpr):
    """Narrows [lo, hi) around the threshold where the predicate (N(t) >= goal_k, or M(t) > goal_mass when
    BY_MASS) turns false, until at most CAP tokens lie inside; returns the final bracket, N and M at its top,
    and the count gathered in the scratch row (the bracket's tokens, in token order)."""
    hi = float("inf")
    n_hi = tl.zeros((), tl.int32)
    m_hi = tl.zeros((), tl.float32)
    count = tl.zeros((), tl.int32)
    done = tl.zeros((), tl.int32)
    for it in range(MAX_PASSES):
        if done == 0:
            q1, q2, q3, n0, n1, n2, n3, s0, s1, s2, s3, count = _bracket_pass(
                row_ptr, V, inv_t, m, lo, hi, buf_v, buf_i, BLOCK, CAP)
            if (count <= CAP) | (it == MAX_PASSES - 1):
                done = 1
            else:
                if BY_MASS:
                    p1 = s1 > goal_mass
                    p2 = s2 > goal_mass
                    p3 = s3 > goal_mass
                else:
                    p1 = n1 >= goal_k
                    p2 = n2 >= goal_k
                    p3 = n3 >= goal_k
                # monotone: the pivots where it holds come first; the new bracket is the first step where it fails
                new_lo = tl.where(p3, q3, tl.where(p2, q2, tl.where(p1, q1, lo)))
                new_hi = tl.where(p3, hi, tl.where(p2, q3, tl.where(p1, q2, q1)))
                n_hi = tl.where(p3, n_hi, tl.where(p2, n3, tl.where(p1, n2, n1)))
                m_hi = tl.where(p3, m_hi, tl.where(p2, s3, tl.where(p1, s2, s1)))
                lo = new_lo
                hi = new_hi
    return lo, hi, n_hi, m_hi, count


@triton.jit
def _sorted_bracket(buf_v, count, CAP: tl.constexpr):
    """The gathered values, descending (-inf past the count)."""
    tl.debug_barrier()  # the scratch row was written by every thread of the program
    idx = tl.arange(0, CAP)
    vals = tl.load(buf_v + idx, mask=idx < count, other=float("-inf"))
    return tl.sort(vals, descending=True), idx


@triton.jit
def _sample_kernel(
    logits_ptr, stride_row, params_ptr, out_ptr, scratch_ptr, V,
    FLOOR: tl.constexpr, BLOCK: tl.constexpr, CAP: tl.constexpr, MAX_PASSES: tl.constexpr,
    P_GREEDY: tl.constexpr, P_TOP_K: tl.constexpr, P_SEED_LO: tl.constexpr, P_SEED_HI: tl.constexpr,
    P_OFFSET: tl.constexpr, P_INV_TEMP: tl.constexpr, P_TOP_P: tl.constexpr, P_MIN_P: tl.constexpr,
    NUM_PARAMS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    p = params_ptr + row * NUM_PARAMS
    greedy = tl.load(p + P_GREEDY)
    top_k = tl.load(p + P_TOP_K)
    seed_lo = tl.load(p + P_SEED_LO).to(tl.uint32, bitcast=True)
    seed_hi = tl.load(p + P_SEED_HI).to(tl.uint32, bitcast=True)
    offset = tl.load(p + P_OFFSET).to(tl.uint32, bitcast=True)
    inv_t = tl.load(p + P_INV_TEMP).to(tl.float32, bitcast=True)
    top_p = tl.load(p + P_TOP_P).to(tl.float32, bitcast=True)
    min_p = tl.load(p + P_MIN_P).to(tl.float32, bitcast=True)
    buf_v = scratch_ptr + row * (2 * CAP)
    buf_i = buf_v + CAP  # token ids as float32: exact below 2^24

    # 1. max, softmax mass, argmax
    m = tl.full((), float("-inf"), tl.float32)
    z = tl.zeros((), tl.float32)
    best = tl.zeros((), tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = _load_scaled(row_ptr, offs, V, inv_t)
        bm = tl.max(x, 0)
        bi = tl.argmax(x, 0)
        if bm > m:
            best = start + bi
        new_m = tl.maximum(m, bm)
        safe = tl.where(new_m == float("-inf"), 0.0, new_m)
        z = z * tl.exp(m - safe) + tl.sum(tl.exp(x - safe), 0)
        m = new_m
    token = best.to(tl.int64)
    if (greedy == 0) & (m > float("-inf")):
        threshold = m - FLOOR
        if min_p > 0.0:
            threshold = tl.maximum(threshold, m + tl.log(min_p))
        buffered = 0  # the last search's scratch row holds every token the threshold keeps
        k = tl.minimum(top_k, V)
        # 2a. top-k: the k-th largest value
        if top_k < V:
            lo, hi, n_hi, m_hi, count = _search(row_ptr, V, inv_t, m, m - FLOOR, top_k, 0.0, False, buf_v, buf_i,
                                                BLOCK, CAP, MAX_PASSES)
            ordered, idx = _sorted_bracket(buf_v, count, CAP)
            j = top_k - n_hi - 1
            kth = tl.sum(tl.where(idx == j, ordered, 0.0), 0)
            kth = tl.where(j < tl.minimum(count, CAP), kth, lo)
            threshold = tl.maximum(threshold, kth)
            buffered = ((n_hi == 0) & (count <= CAP)).to(tl.int32)
        # 2b. top-p over what min_p and top-k kept
        if top_p < 1.0:
            z_kept = z
            if threshold > m - FLOOR:  # min_p or top-k cut: the mass they kept
                z_kept = tl.zeros((), tl.float32)
                for start in range(0, V, BLOCK):
                    offs = start + tl.arange(0, BLOCK)
                    x = _load_scaled(row_ptr, offs, V, inv_t)
                    z_kept += tl.sum(tl.where(x >= threshold, tl.exp(x - m), 0.0), 0)
            goal = top_p * z_kept
            # No token below this is in the top-p set: the tokens under it weigh less than (1 - top_p) of z_kept.
            bound = m + tl.log(z_kept * (1.0 - top_p) / k.to(tl.float32))
            lo, hi, n_hi, m_hi, count = _search(row_ptr, V, inv_t, m, tl.maximum(threshold, bound), 0, goal, True,
                                                buf_v, buf_i, BLOCK, CAP, MAX_PASSES)
            ordered, idx = _sorted_bracket(buf_v, count, CAP)
            mass = m_hi + tl.cumsum(tl.where(ordered > float("-inf"), tl.exp(ordered - m), 0.0), 0)
            first = tl.min(tl.where(mass > goal, idx, CAP), 0)
            cut = tl.sum(tl.where(idx == first, ordered, 0.0), 0)
            cut = tl.where(first < tl.minimum(count, CAP), cut, lo)
            threshold = tl.maximum(threshold, cut)
            buffered = ((n_hi == 0) & (count <= CAP)).to(tl.int32)
        # 3. Gumbel-max over the kept tokens
        if buffered != 0:
            tl.debug_barrier()
            idx = tl.arange(0, CAP)
            vals = tl.load(buf_v + idx, mask=idx < count, other=float("-inf"))
            toks = tl.load(buf_i + idx, mask=idx < count, other=0.0).to(tl.int32)
            score = tl.where(vals >= threshold, vals + _gumbel(toks, offset, seed_lo, seed_hi), float("-inf"))
            pick = tl.argmax(score, 0)
            token = tl.sum(tl.where(idx == pick, toks, 0), 0).to(tl.int64)
        else:
            top = tl.full((), float("-inf"), tl.float32)
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                x = _load_scaled(row_ptr, offs, V, inv_t)
                if tl.max(x, 0) >= threshold:
                    noise = _gumbel_tile(start, offset, seed_lo, seed_hi, BLOCK)
                    score = tl.where(x >= threshold, x + noise, float("-inf"))
                    bm = tl.max(score, 0)
                    if bm > top:
                        token = (start + tl.argmax(score, 0)).to(tl.int64)
                        top = bm
    tl.store(out_ptr + row, token)


_scratch: dict[torch.device, torch.Tensor] = {}


def sample(logits: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """int64 [n] tokens of logits [n, V] (any float dtype, rows contiguous) under params int32 [n, SAMPLE_PARAMS]
    (reference.sample's layout). One launch; a scratch row per program, kept between calls (one stream)."""
    n, vocab = logits.shape
    if logits.stride(1) != 1 or params.shape != (n, SAMPLE_PARAMS) or not params.is_contiguous():
        raise ValueError("logits rows must be contiguous and params int32 [n, SAMPLE_PARAMS] contiguous")
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    if n == 0:
        return out
    scratch = _scratch.get(logits.device)
    if scratch is None or scratch.shape[0] < n:
        scratch = _scratch[logits.device] = torch.empty(max(n, 32), 2 * CAP, dtype=torch.float32,
                                                        device=logits.device)
    _sample_kernel[(n,)](
        logits, logits.stride(0), params, out, scratch, vocab,
        FLOOR=FLOOR_GAP, BLOCK=BLOCK, CAP=CAP, MAX_PASSES=MAX_PASSES,
        P_GREEDY=SAMPLE_GREEDY, P_TOP_K=SAMPLE_TOP_K, P_SEED_LO=SAMPLE_SEED_LO, P_SEED_HI=SAMPLE_SEED_HI,
        P_OFFSET=SAMPLE_OFFSET, P_INV_TEMP=SAMPLE_INV_TEMP, P_TOP_P=SAMPLE_TOP_P, P_MIN_P=SAMPLE_MIN_P,
        NUM_PARAMS=SAMPLE_PARAMS, num_warps=NUM_WARPS,
    )
    return out

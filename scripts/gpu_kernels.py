"""Device test and micro-benchmark of tpserve.kernels: every Triton kernel against torch references, then timings.

On the GPU:   python3 scripts/gpu_kernels.py --out $OUT/kernels.md
On CPU, with Triton's interpreter (small cases, no timings):
              TRITON_INTERPRET=1 PYTHONPATH=/tmp/tritonsite python scripts/gpu_kernels.py --device cpu --quick

Attention is checked against a float64 per-sequence loop written here (explicit gather position by position,
explicit softmax) and against the package's batched torch oracle (tpserve.kernels.reference.paged_attention,
which the model runs on CPU). Exits 1 when any check fails; the markdown report is written either way.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# tpserve/__init__ imports the proxy (pyzmq, which the device image lacks); the kernels need none of it, so
# the package is registered bare and only the modules below load.
_package = types.ModuleType("tpserve")
_package.__path__ = [str(ROOT / "tpserve")]
sys.modules.setdefault("tpserve", _package)

from tpserve.kernels import attention as tri_attn  # noqa: E402
from tpserve.kernels import fused as tri_fused  # noqa: E402
from tpserve.kernels import policy, reference  # noqa: E402

# Largest |triton - float64 loop reference| allowed for attention outputs (values of order 1).
ATTN_ATOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}
# Elementwise ops: at most one rounding step apart from the same-dtype torch reference.
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
DTYPE_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class Result:
    name: str
    detail: str
    error: float
    tolerance: float
    note: str = ""

    @property
    def ok(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.tolerance


RESULTS: list[Result] = []


def record(name: str, detail: str, error: float, tolerance: float, note: str = "") -> None:
    r = Result(name, detail, error, tolerance, note)
    RESULTS.append(r)
    print(f"{'ok  ' if r.ok else 'FAIL'} {name:28s} {detail:58s} err {error:.3e} tol {tolerance:.1e} {note}",
          flush=True)


def loop_reference(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale) -> torch.Tensor:
    """float64, one sequence at a time, keys gathered position by position through the block table."""
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for s, ctx in enumerate(lens):
        a, b = starts[s], starts[s + 1]
        if b == a or ctx == 0:
            continue
        pos = torch.arange(ctx, device=q.device)
        blocks = block_tables[s].long()[pos // block_size]
        keys = k_cache[blocks, pos % block_size].double().repeat_interleave(group, dim=1)  # [ctx, Hq, D]
        values = v_cache[blocks, pos % block_size].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("nhd,lhd->hnl", q[a:b].double(), keys) * scale
        query_pos = ctx - (b - a) + torch.arange(b - a, device=q.device)
        scores.masked_fill_(pos[None, None, :] > query_pos[None, :, None], float("-inf"))
        out[a:b] = torch.einsum("hnl,lhd->nhd", scores.softmax(-1), values)
    return out


@dataclass
class Batch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    scale: float

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.query_start_loc, self.seq_lens, self.block_tables,
                self.scale)


def make_batch(rng: random.Random, q_lens: list[int], ctx_lens: list[int], heads: tuple[int, int, int],
               dtype: torch.dtype, device: str, block_size: int = 16, width: int | None = None,
               share_prefix: bool = True) -> Batch:
    """Random q and pool; block ids shuffled over the pool (holes: neighbours are never adjacent blocks,
    unused table entries are 0); when share_prefix, a sequence may reuse another's full cached blocks."""
    num_q_heads, num_kv_heads, head_dim = heads
    need = [-(-c // block_size) for c in ctx_lens]
    width = width or max(max(need), 1)
    ids = list(range(1, sum(need) + 2 * len(ctx_lens) + 2))
    rng.shuffle(ids)
    tables = torch.zeros((len(ctx_lens), width), dtype=torch.int32)
    donors: list[list[int]] = []
    for s, (n, ctx, q_len) in enumerate(zip(need, ctx_lens, q_lens, strict=True)):
        row = [ids.pop() for _ in range(n)]
        full_cached = (ctx - q_len) // block_size
        if share_prefix and donors and full_cached and rng.random() < 0.5:
            donor = rng.choice(donors)
            shared = min(len(donor), full_cached, rng.randint(1, full_cached))
            row[:shared] = donor[:shared]
        donors.append(row[: (ctx - q_len) // block_size])
        tables[s, :n] = torch.tensor(row, dtype=torch.int32)
    num_blocks = max(max(ids, default=0), int(tables.max()) if tables.numel() else 0) + 1
    gen = torch.Generator(device=device).manual_seed(rng.randint(0, 2**31))
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, device=device).to(dtype)
    v_cache = torch.randn(shape, generator=gen, device=device).to(dtype)
    q = torch.randn((sum(q_lens), num_q_heads, head_dim), generator=gen, device=device).to(dtype)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return Batch(q, k_cache, v_cache, qsl, torch.tensor(ctx_lens, dtype=torch.int32, device=device),
                 tables.to(device), head_dim**-0.5)


def check_attention(name: str, batch: Batch, out: torch.Tensor, detail: str) -> None:
    dtype = batch.q.dtype
    loop = loop_reference(*batch.args())
    err = (out.double() - loop).abs().max().item() if out.numel() else 0.0
    f32 = [x.float() if x.is_floating_point() else x for x in batch.args()[:-1]]
    pkg = reference.paged_attention(*f32, batch.scale)
    pkg_err = (pkg.double() - loop).abs().max().item() if out.numel() else 0.0
    note = f"pkg-ref(f32) vs loop {pkg_err:.1e}"
    same_dtype = reference.paged_attention(*batch.args()).double()
    note += f"; torch-{DTYPE_NAME[dtype]} vs loop {(same_dtype - loop).abs().max().item():.1e}"
    record(name, detail, err, ATTN_ATOL[dtype], note)
    record(name + " pkg-ref", detail, pkg_err, 1e-4)


GQA_SHAPES = [(9, 3, 64), (16, 8, 128), (8, 8, 64), (32, 8, 128), (32, 4, 64), (14, 2, 128), (16, 16, 128)]


def attention_cases(device: str, quick: bool, rng: random.Random) -> None:
    max_ctx = 300 if quick else 4096
    max_chunk = 40 if quick else 512
    shapes = GQA_SHAPES[:3] if quick else GQA_SHAPES
    for i, heads in enumerate(shapes):
        for dtype in (torch.bfloat16, torch.float16):
            # both dtypes for the two served shapes, alternating for the rest (each variant compiles anew)
            if (quick or i >= 2) and (i + (dtype == torch.float16)) % 2:
                continue
            block_size = 16 if (i + (dtype == torch.float16)) % 3 else 32
            tag = f"H{heads[0]}/{heads[1]} D{heads[2]} {DTYPE_NAME[dtype]} bs{block_size}"
            # mixed: decodes, prefill chunks over cached prefixes, one fresh prompt
            n_dec, n_chunk = (3, 2) if quick else (rng.randint(2, 12), rng.randint(1, 4))
            q_lens = [1] * n_dec + [rng.randint(2, max_chunk) for _ in range(n_chunk)] + [rng.randint(2, max_chunk)]
            ctx = [rng.randint(1, max_ctx) for _ in range(n_dec)]
            ctx += [q + rng.randint(1, max_ctx - max_chunk) for q in q_lens[n_dec:-1]] + [q_lens[-1]]
            order = list(range(len(q_lens)))
            rng.shuffle(order)
            q_lens, ctx = [q_lens[j] for j in order], [ctx[j] for j in order]
            b = make_batch(rng, q_lens, ctx, heads, dtype, device, block_size)
            check_attention("varlen mixed", b, tri_attn.varlen_attention(*b.args()),
                            f"{tag} S{len(q_lens)} T{sum(q_lens)} ctx<={max(ctx)}")
            # the same kind of step ordered decodes first, split between the two kernels by num_decodes
            order = sorted(range(len(q_lens)), key=lambda j: q_lens[j] != 1)
            q_lens, ctx = [q_lens[j] for j in order], [ctx[j] for j in order]
            b = make_batch(rng, q_lens, ctx, heads, dtype, device, block_size)
            check_attention("mixed, num_decodes split", b, tri_attn.paged_attention(*b.args(), num_decodes=n_dec),
                            f"{tag} S{len(q_lens)} decodes {n_dec} T{sum(q_lens)}")
            # decode: lengths at the edges (1, block and tile boundaries, the maximum) and random
            edges = [1, block_size, block_size + 1, 64, 65, max_ctx]
            n = 4 if quick else 32
            ctx = [edges[j] if j < len(edges) else rng.randint(1, max_ctx) for j in range(n)]
            b = make_batch(rng, [1] * n, ctx, heads, dtype, device, block_size, width=-(-max_ctx // block_size) + 3)
            splits = [None, 1] if i else [None, 1, 4, 32]
            for sp in splits:
                out = tri_attn.decode_attention(b.q, b.k_cache, b.v_cache, b.seq_lens, b.block_tables, b.scale, sp)
                check_attention("decode", b, out, f"{tag} S{n} splits={sp or 'auto'}")
            out = tri_attn.varlen_attention(*b.args())
            check_attention("varlen all-decode", b, out, f"{tag} S{n}")
    # a padding row (seq_len 0) among decodes must give 0, never NaN
    heads = (16, 8, 128)
    b = make_batch(rng, [1, 1, 1], [5, 1, 70], heads, torch.bfloat16, device)
    b.seq_lens[1] = 0
    for sp in (1, 4):
        out = tri_attn.decode_attention(b.q, b.k_cache, b.v_cache, b.seq_lens, b.block_tables, b.scale, sp)
        record("decode seq_len=0 row", f"splits={sp}", out[1].float().abs().max().item(), 0.0)
        check_attention("decode with empty row", b, out, f"splits={sp}")
    # long prefill with no cache, and one long chunk over a long cached prefix
    if not quick:
        for dtype in (torch.bfloat16, torch.float16):
            b = make_batch(rng, [1024, 1], [1024, 4096], (16, 8, 128), dtype, device)
            check_attention("varlen long", b, tri_attn.varlen_attention(*b.args()), f"prefill 1024 + decode {dtype}")
            b = make_batch(rng, [700, 3], [4096, 2000], (9, 3, 64), dtype, device)
            check_attention("varlen long", b, tri_attn.varlen_attention(*b.args()), f"chunk 700 over 3396 {dtype}")


def one_step_apart(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(largest |out - ref| in rounding steps at the magnitude of the row's largest |ref|, fraction
    bit-identical). Per row, not per element: RoPE's difference of two rounded products can cancel to a
    value far smaller than the rounding steps that made it."""
    step = ref.float().abs().amax(-1, keepdim=True).clamp_min(1e-6) * 2.0 ** -MANTISSA_BITS[ref.dtype]
    diff = (out.float() - ref.float()).abs()
    return (diff / step).max().item(), (out == ref).float().mean().item()


def fused_cases(device: str, quick: bool, rng: random.Random) -> None:
    gen = torch.Generator(device=device).manual_seed(rng.randint(0, 2**31))

    def randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device).to(dtype)

    for dtype in (torch.bfloat16, torch.float16):
        # store_kv: distinct real slots, padding rows into block 0
        for heads, block_size in (((3, 64), 16), ((8, 128), 32)):
            num_blocks, t = 64, 40 if quick else 700
            k, v = randn(t, *heads, dtype=dtype), randn(t, *heads, dtype=dtype)
            slots = torch.randperm((num_blocks - 1) * block_size, generator=gen, device=device)[:t] + block_size
            slots[-3:] = torch.tensor([0, 1, 0], device=device)
            slots = slots.to(torch.int32)
            caches = [randn(num_blocks, block_size, *heads, dtype=dtype) for _ in range(2)]
            ref = [c.clone() for c in caches]
            tri_fused.store_kv(k, v, caches[0], caches[1], slots)
            reference.store_kv(k, v, ref[0], ref[1], slots)
            err = max((a[1:] != b[1:]).float().sum().item() for a, b in zip(caches, ref, strict=True))
            record("store_kv", f"Hkv{heads[0]} D{heads[1]} bs{block_size} T{t} {DTYPE_NAME[dtype]}", err, 0,
                   "mismatched elements outside block 0")
        # q/k norm + RoPE + store, q/k/v as strided views of one qkv row as the model has them
        for hq, hkv, d, norm, theta in ((16, 8, 128, True, 1e6), (9, 3, 64, False, 1e4), (32, 8, 128, False, 5e5)):
            t, block_size, num_blocks = (9 if quick else 300), 16, 64
            qkv = randn(t, (hq + 2 * hkv) * d, dtype=dtype) * 3
            q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
            q, k, v = q.unflatten(-1, (hq, d)), k.unflatten(-1, (hkv, d)), v.unflatten(-1, (hkv, d))
            inv_freq = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
            cos_sin = reference.build_cos_sin_cache(inv_freq.to(device), 4096)
            positions = torch.randint(0, 4096, (t,), generator=gen, device=device).to(torch.int32)
            slots = torch.randperm((num_blocks - 1) * block_size, generator=gen, device=device)[:t] + block_size
            slots = slots.to(torch.int32)
            qw = (1 + 0.2 * randn(d, dtype=torch.float32)).to(dtype) if norm else None
            kw = (1 + 0.2 * randn(d, dtype=torch.float32)).to(dtype) if norm else None
            caches = [randn(num_blocks, block_size, hkv, d, dtype=dtype) for _ in range(2)]
            ref_caches = [c.clone() for c in caches]
            args = (q, k, v, positions, cos_sin, qw, kw, 1e-6)
            q_tri = tri_fused.qk_norm_rope_store(*args, *caches, slots)
            q_ref = reference.qk_norm_rope_store(*args, *ref_caches, slots)
            tag = f"H{hq}/{hkv} D{d} norm={norm} T{t} {DTYPE_NAME[dtype]}"
            # With the norm: a float32 sum order that differs from torch's can flip one rounding of the
            # normalized value, which the weight multiply and the rotation carry on: up to 2 steps.
            tol = 2.0 if norm else 1.0
            steps, same = one_step_apart(q_tri, q_ref)
            record("qk_norm_rope_store q", tag, steps, tol, f"{same:.4%} bit-identical")
            steps, same = one_step_apart(caches[0], ref_caches[0])
            record("qk_norm_rope_store k", tag, steps, tol, f"{same:.4%} bit-identical")
            record("qk_norm_rope_store v", tag, (caches[1] != ref_caches[1]).float().sum().item(), 0)
        # add + RMSNorm, RMSNorm, SiLU-and-mul
        for hidden, inter in ((576, 1536), (1024, 3072)):
            for rows in (1, 33) if quick else (1, 33, 2048):
                x, r = randn(rows, hidden, dtype=dtype), randn(rows, hidden, dtype=dtype) * 4
                w = (1 + 0.2 * randn(hidden, dtype=torch.float32)).to(dtype)
                normed, res = tri_fused.add_rmsnorm(x, r, w, 1e-5)
                normed_ref, res_ref = reference.add_rmsnorm(x, r, w, 1e-5)
                tag = f"hidden {hidden} rows {rows} {DTYPE_NAME[dtype]}"
                steps, same = one_step_apart(normed, normed_ref)
                record("add_rmsnorm out", tag, steps, 1.0, f"{same:.4%} bit-identical")
                record("add_rmsnorm residual", tag, (res != res_ref).float().sum().item(), 0)
                steps, same = one_step_apart(tri_fused.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5))
                record("rms_norm", tag, steps, 1.0, f"{same:.4%} bit-identical")
                gu = randn(rows, 2 * inter, dtype=dtype) * 3
                steps, same = one_step_apart(tri_fused.silu_and_mul(gu), reference.silu_and_mul(gu))
                record("silu_and_mul", f"I {inter} rows {rows} {DTYPE_NAME[dtype]}", steps, 1.0,
                       f"{same:.4%} bit-identical")


def graph_and_sync_checks(rng: random.Random) -> None:
    """The launchers inside CUDA graph capture, replayed on new metadata; and no host sync in any launcher."""
    heads = (16, 8, 128)
    for path, q_lens, ctx in (("decode", [1] * 8, [300] * 8), ("varlen", [1, 1, 64, 200], [900, 20, 64, 1000])):
        b = make_batch(rng, q_lens, ctx, heads, torch.bfloat16, "cuda", width=128)
        fn = tri_attn.paged_attention
        fn(*b.args())  # compile before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(*b.args())
        fresh = make_batch(rng, q_lens, [c + rng.randint(0, 10) for c in ctx], heads,
                           torch.bfloat16, "cuda", width=128)
        blocks = min(fresh.k_cache.shape[0], b.k_cache.shape[0])
        fresh.k_cache, fresh.v_cache = fresh.k_cache[:blocks].clone(), fresh.v_cache[:blocks].clone()
        fresh.block_tables.clamp_(max=blocks - 1)
        b.k_cache[:blocks].copy_(fresh.k_cache)
        b.v_cache[:blocks].copy_(fresh.v_cache)
        for name in ("q", "query_start_loc", "seq_lens", "block_tables"):
            getattr(b, name).copy_(getattr(fresh, name))
        graph.replay()
        torch.cuda.synchronize()
        fresh.k_cache, fresh.v_cache = b.k_cache, b.v_cache
        check_attention(f"graph replay {path}", fresh, out, "new q, lengths, tables after capture")
    b = make_batch(rng, [1, 3, 1], [100, 50, 7], heads, torch.bfloat16, "cuda")
    qkv = torch.randn(5, 32 * 128, device="cuda", dtype=torch.bfloat16)
    cos_sin = reference.build_cos_sin_cache(torch.rand(64, device="cuda"), 4096)
    pos = torch.arange(5, device="cuda", dtype=torch.int32)
    slots = torch.arange(16, 21, device="cuda", dtype=torch.int32)
    w = torch.ones(128, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.split([2048, 1024, 1024], -1)
    q, k, v = q.unflatten(-1, (16, 128)), k.unflatten(-1, (8, 128)), v.unflatten(-1, (8, 128))
    calls: list[Callable[[], object]] = [
        lambda: tri_attn.paged_attention(*b.args()),
        lambda: tri_attn.decode_attention(b.q[:3], b.k_cache, b.v_cache, b.seq_lens, b.block_tables, b.scale),
        lambda: tri_fused.qk_norm_rope_store(q, k, v, pos, cos_sin, w, w, 1e-6, b.k_cache, b.v_cache, slots),
        lambda: tri_fused.store_kv(k, v, b.k_cache, b.v_cache, slots),
        lambda: tri_fused.add_rmsnorm(qkv[:, :1024], qkv[:, 1024:2048], w.repeat(8), 1e-6),
        lambda: tri_fused.silu_and_mul(qkv),
    ]
    for call in calls:
        call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for call in calls:
            call()
        synced = 0
    except RuntimeError as exc:
        print("host sync:", exc)
        synced = 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    record("no host sync", "all launchers, sync_debug_mode=error", synced, 0)


def graph_time_us(fn: Callable[[], object], calls: int = 20, reps: int = 20) -> float:
    """GPU time per call: `calls` launches captured in one CUDA graph, median of `reps` replays."""
    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return sorted(times)[len(times) // 2]


def eager_time_us(fn: Callable[[], object], reps: int = 50) -> float:
    """Wall time per call with the host launching each (what an eager step pays)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e6


def torch_decode(b: Batch) -> Callable[[], object]:
    """The eager baseline: gather every sequence's blocks to a padded contiguous KV, masked SDPA."""
    s, width = b.block_tables.shape
    block_size, hkv, d = b.k_cache.shape[1:]
    keys = torch.arange(width * block_size, device="cuda")
    mask = (keys[None, :] < b.seq_lens[:, None])[:, None, None, :]
    idx = b.block_tables.long()

    def run() -> torch.Tensor:
        k = b.k_cache[idx].view(s, -1, hkv, d).transpose(1, 2)
        v = b.v_cache[idx].view(s, -1, hkv, d).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(
            b.q[:, :, None, :], k, v, attn_mask=mask, scale=b.scale,
            enable_gqa=True)

    return run


MODELS = {"SmolLM2-135M": (9, 3, 64, 576, 1536), "Qwen3-0.6B": (16, 8, 128, 1024, 3072)}


def time_pair(op: str, shape: str, triton_fn: Callable[[], object], torch_fn: Callable[[], object]) -> str:
    return f"| {op} | {shape} | {graph_time_us(triton_fn):.1f} | {graph_time_us(torch_fn):.1f} |"


def timings(rng: random.Random) -> list[str]:
    lines = ["## Decode attention, one layer (bf16, block_size 16, block table width 256 = 4096 tokens)", "",
             "| model | batch | context | splits | Triton in graph (us) | Triton eager (us) | torch gather+SDPA "
             "in graph (us) | KV read GB/s (Triton) |", "|---|---|---|---|---|---|---|---|"]
    sms = policy.num_sms(0)
    for model, (hq, hkv, d, _, _) in MODELS.items():
        for batch in (1, 32):
            for ctx in (128, 512, 1024, 2048, 4096):
                b = make_batch(rng, [1] * batch, [ctx] * batch, (hq, hkv, d), torch.bfloat16, "cuda", width=256,
                               share_prefix=False)
                splits = policy.num_kv_splits(batch, hkv, 256 * 16, sms)
                tri = graph_time_us(lambda b=b: tri_attn.paged_attention(*b.args()))
                eager = eager_time_us(lambda b=b: tri_attn.paged_attention(*b.args()))
                base = graph_time_us(torch_decode(b), calls=5, reps=10)
                gbs = batch * ctx * hkv * d * 2 * 2 / (tri * 1e-6) / 1e9
                lines.append(f"| {model} | {batch} | {ctx} | {splits} | {tri:.1f} | {eager:.1f} | {base:.1f} | "
                             f"{gbs:.0f} |")
                print(lines[-1], flush=True)
    lines += ["", "## Varlen (prefill / mixed) attention, one layer, Qwen3-0.6B heads (16/8, D128), bf16", "",
              "| batch | Triton in graph (us) | torch per-sequence SDPA reference, eager (us) |", "|---|---|---|"]
    for label, q_lens, ctx in (
        ("1 prompt x 512", [512], [512]),
        ("4 prompts x 512", [512] * 4, [512] * 4),
        ("chunk 512 over 3584 cached", [512], [4096]),
        ("31 decodes (ctx 1024) + chunk 256 over 256", [1] * 31 + [256], [1024] * 31 + [512]),
    ):
        b = make_batch(rng, q_lens, ctx, (16, 8, 128), torch.bfloat16, "cuda", share_prefix=False)
        tri = graph_time_us(lambda b=b: tri_attn.paged_attention(*b.args()), calls=5, reps=10)
        ref = eager_time_us(lambda b=b: reference.paged_attention(*b.args()), reps=5)
        lines.append(f"| {label} | {tri:.1f} | {ref:.1f} |")
        print(lines[-1], flush=True)
    lines += ["", "Mixed step with num_decodes (decodes first; decode kernel + varlen kernel):", ""]
    b = make_batch(rng, [1] * 31 + [256], [1024] * 31 + [512], (16, 8, 128), torch.bfloat16, "cuda",
                   share_prefix=False)
    split = graph_time_us(lambda: tri_attn.paged_attention(*b.args(), num_decodes=31), calls=5, reps=10)
    lines.append(f"| 31 decodes (ctx 1024) + chunk 256 over 256, num_decodes=31 | {split:.1f} | |")
    print(lines[-1], flush=True)
    lines += ["", "## Fused small ops, bf16 (GPU time per call, both in CUDA graphs)", "",
              "| op | shape | Triton (us) | torch reference (us) |", "|---|---|---|---|"]
    for model, (hq, hkv, d, hidden, inter) in MODELS.items():
        for t in (1, 32, 2048):
            dev, dt = "cuda", torch.bfloat16
            qkv = torch.randn(t, (hq + 2 * hkv) * d, device=dev, dtype=dt)
            q, k, v = qkv.split([hq * d, hkv * d, hkv * d], -1)
            q, k, v = q.unflatten(-1, (hq, d)), k.unflatten(-1, (hkv, d)), v.unflatten(-1, (hkv, d))
            cos_sin = reference.build_cos_sin_cache(torch.rand(d // 2, device=dev), 4096)
            pos = torch.randint(0, 4096, (t,), device=dev, dtype=torch.int32)
            slots = torch.randperm(4096 * 16, device=dev)[:t].to(torch.int32) + 16
            caches = [torch.randn(4100, 16, hkv, d, device=dev, dtype=dt) for _ in range(2)]
            w = torch.ones(d, device=dev, dtype=dt) if model.startswith("Qwen") else None
            args = (q, k, v, pos, cos_sin, w, w, 1e-6, *caches, slots)
            x = torch.randn(t, hidden, device=dev, dtype=dt)
            r, wh = torch.randn_like(x), torch.ones(hidden, device=dev, dtype=dt)
            gu = torch.randn(t, 2 * inter, device=dev, dtype=dt)
            op = "qk_norm_rope_store" if w is not None else "rope_store"
            shape = f"{model} T={t}"
            lines += [
                time_pair(op, shape, partial(tri_fused.qk_norm_rope_store, *args),
                          partial(reference.qk_norm_rope_store, *args)),
                time_pair("add_rmsnorm", shape, partial(tri_fused.add_rmsnorm, x, r, wh, 1e-6),
                          partial(reference.add_rmsnorm, x, r, wh, 1e-6)),
                time_pair("silu_and_mul", shape, partial(tri_fused.silu_and_mul, gu),
                          partial(reference.silu_and_mul, gu)),
            ]
            print("\n".join(lines[-3:]), flush=True)
    return lines + launch_costs(rng)


@triton.jit
def _noop_kernel(x_ptr):
    pass


def launch_costs(rng: random.Random) -> list[str]:
    """Host time per call when launched eagerly (prefill and mixed steps run eager) next to GPU time."""
    lines = ["", "## Eager launch cost (host-bound wall time per call, bf16, Qwen3-0.6B shapes)", "",
             "| call | eager (us) | GPU time in a graph (us) |", "|---|---|---|"]
    x1 = torch.empty(1, device="cuda")
    decode = make_batch(rng, [1], [512], (16, 8, 128), torch.bfloat16, "cuda", width=256)
    prefill = make_batch(rng, [512], [512], (16, 8, 128), torch.bfloat16, "cuda")
    qkv = torch.randn(512, 32 * 128, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.split([2048, 1024, 1024], -1)
    q, k, v = q.unflatten(-1, (16, 128)), k.unflatten(-1, (8, 128)), v.unflatten(-1, (8, 128))
    cos_sin = reference.build_cos_sin_cache(torch.rand(64, device="cuda"), 4096)
    pos = torch.arange(512, device="cuda", dtype=torch.int32)
    slots = torch.arange(16, 528, device="cuda", dtype=torch.int32)
    w = torch.ones(128, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    wh = torch.ones(1024, device="cuda", dtype=torch.bfloat16)
    calls = {
        "empty Triton kernel, 1 argument": lambda: _noop_kernel[(1,)](x1),
        "torch.empty_like (allocator)": lambda: torch.empty_like(x),
        "paged_attention decode, S=1 ctx 512 (2 kernels)": lambda: tri_attn.paged_attention(*decode.args()),
        "paged_attention varlen, 1 x 512 prompt": lambda: tri_attn.paged_attention(*prefill.args()),
        "qk_norm_rope_store, T=512": lambda: tri_fused.qk_norm_rope_store(
            q, k, v, pos, cos_sin, w, w, 1e-6, decode.k_cache, decode.v_cache, slots),
        "add_rmsnorm, T=512": lambda: tri_fused.add_rmsnorm(x, x, wh, 1e-6),
        "silu_and_mul, T=512": lambda: tri_fused.silu_and_mul(qkv),
    }
    for name, call in calls.items():
        lines.append(f"| {name} | {eager_time_us(call, reps=200):.1f} | {graph_time_us(call):.1f} |")
        print(lines[-1], flush=True)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small shapes (for the CPU interpreter)")
    parser.add_argument("--no-timings", action="store_true")
    parser.add_argument("--only", choices=("all", "fused"), default="all",
                        help="fused: the small-op checks alone (a quick re-check after changing fused.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "kernels.md"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    everything = args.only == "all"
    if everything:
        attention_cases(args.device, args.quick, rng)
    fused_cases(args.device, args.quick, rng)
    on_gpu = args.device == "cuda"
    if on_gpu and everything:
        graph_and_sync_checks(rng)
    t_checks = time.perf_counter() - t0
    timing_lines = timings(rng) if on_gpu and everything and not args.no_timings else []
    failed = [r for r in RESULTS if not r.ok]
    env = f"torch {torch.__version__}"
    if on_gpu:
        env += f", triton {triton.__version__}, {torch.cuda.get_device_name()}"
    lines = [f"# tpserve.kernels on {env}", "",
             f"`{' '.join(sys.argv)}` (seed {args.seed}): {len(RESULTS)} checks, {len(failed)} failed; checks "
             f"{t_checks:.0f} s (Triton compiles included), total {time.perf_counter() - t0:.0f} s.", "",
             "Attention error: max |Triton - float64 per-sequence loop|; tolerance "
             + ", ".join(f"{DTYPE_NAME[k]} {v}" for k, v in ATTN_ATOL.items())
             + ". Elementwise ops: max |Triton - same-dtype torch reference| in rounding steps at the "
             "magnitude of the row's largest value (max|ref row| * 2^-mantissa_bits); tolerance 1 step, 2 where "
             "q/k pass a per-head norm before RoPE. "
             "Exact ops (KV store, residual sum): number of differing elements, tolerance 0.", "",
             "| check | case | error | tolerance | ok | note |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.name} | {r.detail} | {r.error:.3e} | {r.tolerance:.1e} | {'yes' if r.ok else '**NO**'} | "
              f"{r.note} |" for r in RESULTS]
    lines += ["", *timing_lines]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"{len(RESULTS)} checks, {len(failed)} failed; report in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

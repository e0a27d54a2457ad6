"""Device check and micro-benchmark of the batched sampler (tpserve.kernels.sampling) at Qwen3-0.6B's vocabulary.

On the GPU:   python3 scripts/gpu_sampler.py [--out $OUT/sampler.md] [--sweep]

1. Tokens: the Triton kernel against the torch reference (tpserve.kernels.reference.sample: sort-based
   thresholds, the same Philox noise) on [32, 151936] logits, float32 and bfloat16, rows of every kind
   (peaked and flat, greedy, temperature, top-k, top-p, min_p and their mixes, NaN/inf). A mismatch can only
   come from a float sum of top-p's landing on the other side of a boundary, or from a near-tie of two
   noisy scores: the script prints their number, and fails above 1 per 1000 rows.
2. Timings (CUDA events, median of 50): greedy argmax against the kernel with temperature 0.8, top-p 0.9 and
   per-request seeds, at batch 1, 32 and 256, on peaked logits (an LLM's) and flat ones (random weights),
   and the host time of one Sampler.sample call (per-row parameters built and copied, one launch).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# tpserve/__init__ imports the proxy (pyzmq, which the device image may lack); only the modules below load.
_package = types.ModuleType("tpserve")
_package.__path__ = [str(ROOT / "tpserve")]
sys.modules.setdefault("tpserve", _package)

from tpserve.kernels import reference, sampling  # noqa: E402

VOCAB = 151_936


def packed(n: int, temperature: float, top_k: int, top_p: float, min_p: float, greedy: bool = False,
           first_seed: int = 0) -> torch.Tensor:
    rows = torch.zeros(n, reference.SAMPLE_PARAMS, dtype=torch.int32)
    rows[:, reference.SAMPLE_GREEDY] = int(greedy)
    rows[:, reference.SAMPLE_TOP_K] = min(top_k, VOCAB) or VOCAB
    rows[:, reference.SAMPLE_SEED_LO] = torch.arange(first_seed, first_seed + n, dtype=torch.int32)
    rows[:, reference.SAMPLE_OFFSET] = torch.arange(n, dtype=torch.int32) * 7
    floats = torch.tensor([1.0 / temperature, top_p, min_p], dtype=torch.float32).view(torch.int32)
    rows[:, reference.SAMPLE_INV_TEMP:] = floats
    return rows


def make_logits(n: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """"peaked": an LLM's shape (a few tokens far above a normal bulk); "flat": random weights' near-uniform."""
    x = torch.randn(n, VOCAB, generator=gen)
    if kind == "peaked":
        x = x * 2.0
        top = torch.randint(0, VOCAB, (n, 8), generator=gen)
        x.scatter_(1, top, 12.0 + 4.0 * torch.rand(n, 8, generator=gen))
    else:
        x = x * 0.3
    return x


def mixed_params(n: int) -> torch.Tensor:
    kinds = [packed(1, 1, 0, 1, 0, greedy=True), packed(1, 0.8, 0, 0.9, 0), packed(1, 1.0, 0, 1.0, 0),
             packed(1, 1.0, 50, 1.0, 0), packed(1, 0.7, 40, 0.95, 0), packed(1, 1.2, 0, 1.0, 0.05),
             packed(1, 0.6, 0, 0.5, 0.02), packed(1, 1.0, 5000, 0.99, 0), packed(1, 0.9, 1, 1.0, 0)]
    rows = torch.cat([kinds[i % len(kinds)] for i in range(n)])
    rows[:, reference.SAMPLE_SEED_LO] = torch.arange(n, dtype=torch.int32) * 1000 + 17
    rows[:, reference.SAMPLE_OFFSET] = torch.arange(n, dtype=torch.int32)
    return rows


def check_tokens(dev: torch.device, lines: list[str]) -> bool:
    gen = torch.Generator().manual_seed(0)
    ok = True
    total = bad = 0
    for dtype in (torch.float32, torch.bfloat16):
        for kind in ("peaked", "flat"):
            for trial in range(4):
                logits = make_logits(32, kind, gen)
                if trial == 3:
                    logits[0, 5] = float("nan")
                    logits[1, 9] = float("inf")
                    logits[2] = float("-inf")
                logits = logits.to(dev, dtype)
                params = mixed_params(32)
                params[:, reference.SAMPLE_OFFSET] += trial * 100
                params = params.to(dev)
                got = sampling.sample(logits, params)
                want = reference.sample(logits, params)
                diff = int((got != want).sum())
                total += 32
                bad += diff
                if diff:
                    rows = (got != want).nonzero().flatten().tolist()
                    lines.append(f"- {dtype} {kind} trial {trial}: rows {rows} differ: kernel "
                                 f"{got[rows].tolist()} reference {want[rows].tolist()}")
    lines.append(f"tokens: {total - bad}/{total} rows the same as the reference")
    if bad * 1000 > total:
        ok = False
    return ok


def median_us(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def host_us(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def bench(dev: torch.device, lines: list[str]) -> None:
    gen = torch.Generator().manual_seed(1)
    lines.append("")
    lines.append("| logits | batch | greedy argmax us | random kernel us (t 0.8, top-p 0.9, seeds) | ratio | "
                 "top-k 50 us | pure temperature us |")
    lines.append("|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for kind in ("peaked", "flat"):
            for n in (1, 32, 256):
                logits = make_logits(n, kind, gen).to(dev, dtype)
                topp = packed(n, 0.8, 0, 0.9, 0).to(dev)
                topk = packed(n, 1.0, 50, 1.0, 0).to(dev)
                temp = packed(n, 1.0, 0, 1.0, 0).to(dev)
                g = median_us(lambda: torch.argmax(logits, dim=-1))  # noqa: B023
                r = median_us(lambda: sampling.sample(logits, topp))  # noqa: B023
                k = median_us(lambda: sampling.sample(logits, topk))  # noqa: B023
                t = median_us(lambda: sampling.sample(logits, temp))  # noqa: B023
                lines.append(f"| {str(dtype)[6:]} {kind} | {n} | {g:.1f} | {r:.1f} | {r / g:.2f} | {k:.1f} | {t:.1f} |")
    try:  # the whole call as the executor makes it: parameters from the requests, one copy, one launch
        from tpserve.executor.request import Request
        from tpserve.executor.sampler import Sampler
        from tpserve.sampling_params import SamplingParams
    except ImportError as e:
        lines.append(f"\nSampler.sample host time: skipped ({e})")
        return
    sampler = Sampler(dev, 0)
    lines.append("")
    lines.append("| batch | Sampler.sample greedy: host us / GPU us | temperature 0.8 + top-p 0.9 + seeds: host us / GPU us |")
    lines.append("|---|---|---|")
    for n in (1, 32, 256):
        logits = make_logits(n, "peaked", gen).to(dev)
        greedy = [Request(i, [1], SamplingParams(temperature=0), False) for i in range(n)]
        seeded = [Request(i, [1], SamplingParams(temperature=0.8, top_p=0.9, seed=i), False) for i in range(n)]
        cells = []
        for reqs in (greedy, seeded):
            h = host_us(lambda: sampler.sample(logits, reqs))  # noqa: B023
            d = median_us(lambda: sampler.sample(logits, reqs))  # noqa: B023
            cells.append(f"{h:.1f} / {d:.1f}")
        lines.append(f"| {n} | {cells[0]} | {cells[1]} |")


def sweep(dev: torch.device, lines: list[str]) -> None:
    """The launch shape: tile, scratch and warps, on the batch-32 top-p case, peaked and flat."""
    gen = torch.Generator().manual_seed(2)
    cases = {kind: make_logits(32, kind, gen).to(dev) for kind in ("peaked", "flat")}
    params = packed(32, 0.8, 0, 0.9, 0).to(dev)
    lines.append("\n| BLOCK | CAP | warps | peaked us | flat us |\n|---|---|---|---|---|")
    for block, cap, warps in [(1024, 1024, 4), (2048, 1024, 8), (2048, 2048, 8), (4096, 2048, 8),
                              (4096, 2048, 16), (4096, 4096, 16), (8192, 4096, 16)]:
        sampling.BLOCK, sampling.CAP, sampling.NUM_WARPS = block, cap, warps
        sampling._scratch.clear()
        us = [median_us(lambda: sampling.sample(cases[k], params), 20) for k in ("peaked", "flat")]  # noqa: B023
        lines.append(f"| {block} | {cap} | {warps} | {us[0]:.1f} | {us[1]:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--sweep", action="store_true", help="also time other launch shapes")
    args = ap.parse_args()
    dev = torch.device("cuda")
    lines = [f"# Batched sampler on {torch.cuda.get_device_name(dev)}, vocab {VOCAB}", ""]
    ok = check_tokens(dev, lines)
    bench(dev, lines)
    if args.sweep:
        sweep(dev, lines)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""``tpserve bench latency``: TTFT (and its parts), inter-token latency and throughput of the plain loop,
the overlap loop and overlap + early first-token emission, side by side in one run.

All modes' engines are up at once and the runs interleave (mode after mode, round after round), so a
noisy machine affects every mode alike. Requests are closed-loop: C clients, each sending its next
request when the last one ends; prompts are fixed-length random token ids; ignore_eos fixes lengths.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import threading
import time
from pathlib import Path

from tpserve import LLM, RequestOutput, SamplingParams
from tpserve.engine_args import EngineArgs
from tpserve.latency_stats import chunk_gaps, percentile

MODES = {
    "plain": {"enable_overlap": False},
    "overlap": {"enable_overlap": True, "early_first_token": False},
    "overlap+early": {"enable_overlap": True, "early_first_token": True},
}
PARTS = [  # TTFT = the sum of these hops, from the request's metrics
    ("to rank 0", "arrival_proxy", "arrival_rank0"),
    ("wait for batch", "arrival_rank0", "first_scheduled"),
    ("compute", "first_scheduled", "first_token_host"),
    ("host to publish", "first_token_host", "first_token_published"),
    ("publish to user", "first_token_published", "first_token_received"),
]


def run_load(llm: LLM, concurrency: int, num_requests: int, input_len: int, output_len: int, seed: int,
             vocab: int, temperature: float = 0.0, top_p: float = 1.0) -> tuple[list[RequestOutput], float]:
    """Greedy, or sampled with ``temperature``/``top_p`` and a seed of its own for every request."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, vocab) for _ in range(input_len)] for _ in range(num_requests)]
    params = [SamplingParams(max_tokens=output_len, temperature=temperature, top_p=top_p, ignore_eos=True,
                             seed=seed * 100_003 + i if temperature else None) for i in range(num_requests)]
    outputs: list[RequestOutput] = []
    lock = threading.Lock()
    todo = iter(zip(prompts, params, strict=True))

    def client() -> None:
        while True:
            with lock:
                prompt, p = next(todo, (None, None))
            if prompt is None:
                return
            stream = llm.generate_stream(prompt, p)
            for _ in stream:
                pass
            with lock:
                outputs.append(stream.output)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return outputs, time.perf_counter() - start


def summarize(outputs: list[RequestOutput], wall: float) -> dict:
    ttft = [o.metrics.ttft * 1000 for o in outputs if o.metrics.ttft is not None]
    itl = [gap * 1000 for o in outputs for gap in chunk_gaps(o.metrics.chunk_times)]
    parts = {}
    for name, a, b in PARTS:
        vals = [(getattr(o.metrics, b) - getattr(o.metrics, a)) * 1000 for o in outputs
                if getattr(o.metrics, a) is not None and getattr(o.metrics, b) is not None]
        parts[name] = statistics.median(vals) if vals else float("nan")
    tokens = sum(len(o.token_ids) for o in outputs)
    return {
        "requests": len(outputs), "errors": sum(o.error is not None for o in outputs),
        "ttft_p50": percentile(ttft, 50), "ttft_p90": percentile(ttft, 90), "ttft_p99": percentile(ttft, 99),
        "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99),
        "tokens_per_s": tokens / wall, "ttft_parts_p50": parts,
    }


def bench_model(name: str, model: str | None, args: argparse.Namespace) -> dict:
    engines = {}
    try:
        for mode in args.modes:
            batch = args.max_batch_size or max(args.concurrency)
            seq_len = args.max_seq_len or args.input_len + args.output_len + 8
            # The engines of every mode run side by side on one device: each gets a pool sized for the load
            # (unless told otherwise), not a share of the memory the first one left.
            engine = EngineArgs.from_cli_args(
                args, model=model, max_batch_size=batch, max_seq_len=seq_len,
                kv_cache_tokens=args.kv_cache_tokens or batch * seq_len, **MODES[mode])
            engines[mode] = LLM(**dataclasses.asdict(engine))
        info = next(iter(engines.values())).info
        vocab = min(info["vocab_size"], 49152)
        for llm in engines.values():  # warm-up: first-touch allocations, kernels, caches
            run_load(llm, 2, 4, args.input_len, 8, 0, vocab)
        raw: dict[str, dict[int, list]] = {m: {c: [] for c in args.concurrency} for m in args.modes}
        walls: dict[str, dict[int, float]] = {m: dict.fromkeys(args.concurrency, 0.0) for m in args.modes}
        for rnd in range(args.rounds):
            for c in args.concurrency:
                n = max(args.min_requests, c * args.requests_per_client)
                for mode in args.modes:
                    outs, wall = run_load(engines[mode], c, n, args.input_len, args.output_len, 1000 * rnd + c, vocab,
                                          args.temperature, args.top_p)
                    raw[mode][c] += outs
                    walls[mode][c] += wall
        results = {m: {c: summarize(raw[m][c], walls[m][c]) for c in args.concurrency} for m in args.modes}
        return {"model": name, "device": info["device"], "dtype": info["dtype"], "tp": info["tensor_parallel_size"],
                "results": results}
    finally:
        for llm in engines.values():
            llm.shutdown()


def table(run: dict) -> str:
    rows = ["| mode | conc | TTFT p50 | p90 | p99 | ITL p50 | ITL p99 | out tok/s | TTFT parts p50 (ms): "
            + ", ".join(p for p, _, _ in PARTS) + " |", "|---|---|---|---|---|---|---|---|---|"]
    for mode, by_c in run["results"].items():
        for c, r in by_c.items():
            parts = " / ".join(f"{v:.2f}" for v in r["ttft_parts_p50"].values())
            rows.append(f"| {mode} | {c} | {r['ttft_p50']:.1f} | {r['ttft_p90']:.1f} | {r['ttft_p99']:.1f} | "
                        f"{r['itl_p50']:.2f} | {r['itl_p99']:.2f} | {r['tokens_per_s']:.1f} | {parts} |")
    return "\n".join(rows)


def ratios(run: dict) -> str:
    res = run["results"]
    lines = []
    for c in next(iter(res.values())):
        bits = []
        if "plain" in res and "overlap" in res:
            bits.append(f"overlap/plain tok/s {res['overlap'][c]['tokens_per_s'] / res['plain'][c]['tokens_per_s']:.2f}x")
        if "plain" in res and "overlap+early" in res:
            bits.append(f"overlap+early/plain TTFT p50 {res['overlap+early'][c]['ttft_p50'] / res['plain'][c]['ttft_p50']:.2f}x")
        if "overlap" in res and "overlap+early" in res:
            saved = res["overlap"][c]["ttft_p50"] - res["overlap+early"][c]["ttft_p50"]
            bits.append(f"early saves {saved:.2f} ms TTFT p50 (= {saved / res['overlap'][c]['itl_p50']:.2f} iterations)")
        lines.append(f"- concurrency {c}: " + "; ".join(bits))
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 3.6 * len(runs)), squeeze=False)
    for row, run in zip(axes, runs, strict=True):
        res = run["results"]
        concs = list(next(iter(res.values())))
        width = 0.8 / len(res)
        for i, (mode, by_c) in enumerate(res.items()):
            xs = [j + i * width for j in range(len(concs))]
            row[0].bar(xs, [by_c[c]["ttft_p50"] for c in concs], width, label=mode)
            row[1].bar(xs, [by_c[c]["tokens_per_s"] for c in concs], width, label=mode)
        for ax, title in zip(row, ("TTFT p50 (ms)", "output tokens/s"), strict=True):
            ax.set_xticks([j + width * (len(res) - 1) / 2 for j in range(len(concs))], [f"conc {c}" for c in concs])
            ax.set_title(f"{run['model']} ({run['device']}, {run['dtype']}, TP {run['tp']}): {title}")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_report(runs: list[dict], args: argparse.Namespace, command: str) -> str:
    label = args.label
    body = [f"### {label}", "", f"Command: `{command}`", "",
            f"Input {args.input_len} tokens, output {args.output_len} tokens (ignore_eos), {args.rounds} rounds "
            "interleaved across modes; times in ms.", ""]
    for run in runs:
        body += [f"**{run['model']}** on {run['device']} ({run['dtype']}, TP {run['tp']})", "", table(run), "",
                 ratios(run), ""]
    if args.plot:
        where = os.path.relpath(Path(args.plot).resolve(), Path(args.doc or ".").resolve().parent)
        body += [f"![TTFT and throughput]({where})", ""]
    return "\n".join(body)


def update_doc(doc: Path, label: str, section: str) -> None:
    """Replaces this label's section of docs/benchmarks.md (between markers), keeping the others."""
    begin, end = f"<!-- bench-latency:{label} -->", f"<!-- /bench-latency:{label} -->"
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    block = f"{begin}\n{section}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text, encoding="utf-8")


def add_bench_latency_args(p: argparse.ArgumentParser) -> None:
    """The engine options (but the ones each run sets: model, the loop mode) and the benchmark's own."""
    EngineArgs.add_cli_args(p, skip=("model", *MODES["overlap"]), derived={
        "max_batch_size": "the largest concurrency", "max_seq_len": "input + output + 8"})
    p.add_argument("--model", action="append", default=None,
                   help="model directory (repeatable); default: the built-in model and a random Qwen3-0.6B-shaped one")
    p.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled, a seed per request")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--label", default="cpu", help="section name in the report (e.g. cpu, h100)")
    p.add_argument("--doc", default=None,
                   help="Markdown report to update (this label's section), e.g. docs/benchmarks.md; default: none")
    p.add_argument("--plot", default=None, help="PNG plot to write, e.g. docs/bench_latency_<label>.png; default: none")
    p.add_argument("--json", default=None, help="JSON of every figure to write; default: none")


def bench_latency_main(args: argparse.Namespace, command: str = "tpserve bench latency") -> int:
    from tpserve.model.default_model import cache_dir
    from tpserve.model.random_model import make_model

    models: list[tuple[str, str | None]] = []
    for m in args.model or ["default", "qwen3-0.6b-random"]:
        if m == "default":
            models.append(("SmolLM2-135M-Instruct", None))
        elif m == "qwen3-0.6b-random":
            path = cache_dir() / "bench-models" / "qwen3-0.6b-random"
            if not (path / "config.json").exists():
                make_model(path, "qwen3", size="qwen3-0.6b", seed=0)
            models.append(("Qwen3-0.6B-shaped (random)", str(path)))
        else:
            models.append((Path(m).name, m))
    runs = []
    for name, path in models:
        runs.append(bench_model(name, path, args))
        print(f"\n{name}\n{table(runs[-1])}\n{ratios(runs[-1])}", flush=True)
    # Files only where told: a benchmark run from a checkout must not rewrite its docs by default.
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(runs, Path(args.plot))
    if args.doc:
        update_doc(Path(args.doc), args.label, write_report(runs, args, command))
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    import sys

    parser = argparse.ArgumentParser(prog="python -m tpserve.bench.latency")
    add_bench_latency_args(parser)
    sys.exit(bench_latency_main(parser.parse_args(), "python -m tpserve.bench.latency " + " ".join(sys.argv[1:])))

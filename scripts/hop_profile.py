"""Each hand-off of a request's first token, in and out, at concurrency 1: p50/p90 per hop.

    python scripts/hop_profile.py                    # a tiny random Llama (the default tokenizer), TP 1
    python scripts/hop_profile.py --model DIR        # a real checkpoint (the GPU host: --model the bench's)
    python scripts/hop_profile.py --tree OLD --tree NEW --rounds 3   # code trees side by side, interleaved

The engine runs with ``TPSERVE_HOP_TRACE`` (``tpserve/hop_trace.py``): the proxy and rank 0 stamp each
hand-off with ``time.time()`` (one clock on one host). Hops, in order (the first three are the TTFT part
"to rank 0", the last five "publish to user" and what follows it to the user's thread):

  proxy send      p_submit -> p_sent          the user's thread: checks, encoding, HMAC, the socket
  wire in         p_sent -> r_recv            ZeroMQ's I/O threads, TCP, rank 0's intake waking up
  intake          r_recv -> r_queued          decode, checks, onto the queue (= arrival_rank0)
  to loop         r_queued -> r_fetched       the loop thread takes it (wake-up, broadcast, unpack)
  admit           r_fetched -> scheduled      the executor admits and schedules it
  ... compute ...
  publish         published -> r_sent         stats, delta, encoding, HMAC, the socket (the loop thread)
  wire out        r_sent -> p_woke            ZeroMQ, TCP, the proxy's dispatch thread waking up
  decode          p_woke -> received          checks and decoding (= first_token_received)
  route           received -> p_routed        the stream: metrics, detokenizing, the user's thread told
  to user         p_routed -> user            the user's thread (iterator or asyncio) has the chunk

With several ``--tree``s each round runs every tree in a subprocess (``PYTHONPATH`` = the tree, which the
MPI ranks inherit), one after the other, so a noisy machine hits them alike; medians are over all rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HOPS = [
    ("proxy send", "p_submit", "p_sent"),
    ("wire in", "p_sent", "r_recv"),
    ("intake", "r_recv", "r_queued"),
    ("to loop", "r_queued", "r_fetched"),
    ("admit", "r_fetched", "scheduled"),
    ("publish", "published", "r_sent"),
    ("wire out", "r_sent", "p_woke"),
    ("decode", "p_woke", "received"),
    ("route", "received", "p_routed"),
    ("to user", "p_routed", "user"),
]
PARTS = [  # the TTFT parts of `tpserve bench latency`
    ("to rank 0 (bench)", "p_submit", "r_queued"),
    ("publish to user (bench)", "published", "received"),
    ("published -> user", "published", "user"),
]


def tiny_model() -> str:
    """A tiny random Llama with the default model's tokenizer (built once): hops, not compute."""
    from tpserve.model.default_model import cache_dir, default_model_path
    from tpserve.model.random_model import make_model

    path = cache_dir() / "bench-models" / "hop-tiny-llama"
    if not (path / "config.json").exists():
        make_model(path, "llama", size="tiny", seed=0, tokenizer_dir=default_model_path())
    return str(path)


def run_child(args: argparse.Namespace) -> dict:
    """Runs the engine in this process's tree and returns every request's stamps."""
    trace_dir = tempfile.mkdtemp(prefix="tpserve-hops-")
    os.environ["TPSERVE_HOP_TRACE"] = trace_dir  # before tpserve is imported: its modules read it once
    # On a small CPU host, torch's OpenMP threads spin after each op and take the cores the hand-offs need;
    # the hops, not the model, are measured here (a GPU host runs its model on the GPU).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import tpserve
    from tpserve import LLM, SamplingParams, hop_trace

    model = None if args.model == "default" else tiny_model() if args.model == "tiny" else args.model
    llm = LLM(model, tensor_parallel_size=1, max_batch_size=4, max_seq_len=args.input_len + args.output_len + 8,
              kv_cache_tokens=8 * (args.input_len + args.output_len + 8))
    vocab = min(llm.info["vocab_size"], 49152)
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    user: dict[int, float] = {}
    metrics: dict[int, dict] = {}

    def one_sync() -> None:
        stream = llm.generate_stream([rng.randrange(10, vocab) for _ in range(args.input_len)], params)
        for chunk in stream:
            if chunk.token_ids and stream.request_id not in user:
                user[stream.request_id] = time.time()
        metrics[stream.request_id] = vars(stream.output.metrics)

    async def all_async(n: int) -> None:
        for _ in range(n):
            stream = llm.generate_stream([rng.randrange(10, vocab) for _ in range(args.input_len)], params)
            async for chunk in stream:
                if chunk.token_ids and stream.request_id not in user:
                    user[stream.request_id] = time.time()
            metrics[stream.request_id] = vars(stream.output.metrics)
            await asyncio.sleep(args.gap)

    stop = threading.Event()
    if args.busy:  # another thread running Python in the user's process (a server's event loop under load)
        threading.Thread(target=lambda: [sum(range(200)) for _ in iter(lambda: stop.is_set(), True)],
                         daemon=True).start()
    try:
        for _ in range(args.warmup):
            one_sync()
        user.clear()
        metrics.clear()
        if args.consumer == "asyncio":
            asyncio.run(all_async(args.requests))
        else:
            for _ in range(args.requests):
                one_sync()
                time.sleep(args.gap)  # the engine goes idle between requests, as at concurrency 1
    finally:
        stop.set()
        llm.shutdown()
    stamps: dict[int, dict[str, float]] = {}
    files = glob.glob(os.path.join(trace_dir, "hops.rank0.*.json"))
    rank0 = [s for f in files for s in json.loads(Path(f).read_text())]
    for rid, hop, t in [*hop_trace.STAMPS, *rank0]:
        stamps.setdefault(rid, {}).setdefault(hop, t)
    out = {}
    for rid, m in metrics.items():
        s = stamps.get(rid, {})
        s.update(r_queued=m["arrival_rank0"], scheduled=m["first_scheduled"], published=m["first_token_published"],
                 received=m["first_token_received"], user=user.get(rid))
        out[rid] = s
    return {"tpserve": tpserve.__file__, "rank0_files": len(files), "stamps": out}


def hop_values(runs: list[dict], a: str, b: str) -> list[float]:
    return [(s[b] - s[a]) * 1e3 for run in runs for s in run["stamps"].values()
            if s.get(a) is not None and s.get(b) is not None]


def pct(vals: list[float], q: float) -> float:
    if not vals:
        return float("nan")
    vals = sorted(vals)
    return vals[min(len(vals) - 1, int(q / 100 * len(vals)))]


def report(by_tree: dict[str, list[dict]]) -> str:
    names = list(by_tree)
    head = "| hop | " + " | ".join(f"{n} p50 | p90" for n in names)
    if len(names) > 1:
        head += f" | p50 {names[-1]}/{names[0]}"
    rows = [head + " |", "|---" * (1 + 2 * len(names) + (len(names) > 1)) + "|"]
    for name, a, b in [*HOPS, *PARTS]:
        cells, p50s = [], []
        for n in names:
            v = hop_values(by_tree[n], a, b)
            p50s.append(statistics.median(v) if v else float("nan"))
            cells.append(f"{p50s[-1]:.3f} | {pct(v, 90):.3f}")
        ratio = f" | {p50s[-1] / p50s[0]:.2f}x" if len(names) > 1 and p50s[0] > 0 else ""
        rows.append(f"| {name} | " + " | ".join(cells) + ratio + " |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="a model directory, 'tiny' (default) or 'default' (SmolLM2)")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=4)
    p.add_argument("--gap", type=float, default=0.002, help="seconds between requests (the engine idles)")
    p.add_argument("--busy", action="store_true", help="a thread in the user's process runs Python meanwhile")
    p.add_argument("--consumer", choices=("sync", "asyncio"), default="sync")
    p.add_argument("--tree", action="append", default=None, help="a source tree to run (repeatable)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", default=None, help="write every stamp here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("HOPS " + json.dumps(run_child(args)), flush=True)
        return 0
    trees = args.tree or [str(Path(__file__).resolve().parent.parent)]
    names = [Path(t).resolve().name for t in trees]
    if len(set(names)) < len(names):
        names = [str(Path(t).resolve()) for t in trees]
    by_tree: dict[str, list[dict]] = {n: [] for n in names}
    child_argv = [a for a in sys.argv[1:] if a not in trees and a != "--tree"]
    for rnd in range(args.rounds):
        for tree, name in zip(trees, names, strict=True):
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (tree, os.environ.get("PYTHONPATH")) if p)}
            proc = subprocess.run([sys.executable, __file__, *child_argv, "--child"], env=env, capture_output=True,
                                  text=True, timeout=1200)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("HOPS ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                return 1
            run = json.loads(line[5:])
            if not run["tpserve"].startswith(str(Path(tree).resolve())) or not run["rank0_files"]:
                print(f"{name}: tpserve came from {run['tpserve']}, rank 0 files {run['rank0_files']}", file=sys.stderr)
                return 1
            by_tree[name].append(run)
            print(f"round {rnd + 1} {name}: {len(run['stamps'])} requests", file=sys.stderr, flush=True)
    print(f"{args.requests} requests x {args.rounds} round(s) per tree, concurrency 1, {args.consumer} consumer, "
          f"{'a busy Python thread in the proxy, ' if args.busy else ''}"
          f"{args.input_len} in / {args.output_len} out, model {args.model}; ms\n")
    print(report(by_tree))
    if args.json:
        Path(args.json).write_text(json.dumps(by_tree))
    return 0


if __name__ == "__main__":
    sys.exit(main())

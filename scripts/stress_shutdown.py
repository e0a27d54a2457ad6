"""Repeats the kill scenarios of the shutdown issue and reports trials, p50/max times and orphans.

    python scripts/stress_shutdown.py [--trials 20] [--tp 2] [--only proxy] [--doc docs/reliability.md]

Scenarios (each a fresh engine on a tiny random Llama, real processes really killed):
- kill -9 of rank 0 / of the last rank while requests stream: time until every pending request has
  failed, time shutdown() takes, processes of the launch left afterwards;
- kill -9 of the proxy: time until every worker and mpirun is gone;
- shutdown() with 16 streaming requests in flight: its time, and whether every stream ended.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil

from tpserve import LLM, SamplingParams
from tpserve.proxy.launcher import session_pids

LONG = SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True)


def leftovers(sid: int, grace: float = 10.0) -> int:
    deadline = time.monotonic() + grace
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(session_pids(sid))


def kill_rank(model: str, tp: int, victim: int) -> dict:
    llm = LLM(model=model, tensor_parallel_size=tp, max_seq_len=4100)
    sid = llm.workers.pid
    streams = [llm.generate_stream([3, 4, i], LONG) for i in range(4)]
    next(streams[0])
    ranks = {int(p.environ()["OMPI_COMM_WORLD_RANK"]): p for p in psutil.Process(sid).children(recursive=True)
             if "tpserve.worker" in " ".join(p.cmdline())}
    start = time.monotonic()
    ranks[victim].kill()
    failed = all(s.result(timeout=30).finish_reason == "error" for s in streams)
    detect = time.monotonic() - start
    start = time.monotonic()
    llm.shutdown()
    return {"detect_s": detect, "shutdown_s": time.monotonic() - start, "orphans": leftovers(sid), "ok": failed}


PROXY = textwrap.dedent("""
    import json, sys
    from tpserve import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], tensor_parallel_size=int(sys.argv[2]), max_seq_len=4100)
    print(json.dumps({"mpirun": llm.workers.pid}), flush=True)
    for chunk in llm.generate_stream([1, 2, 3], SamplingParams(max_tokens=4000, ignore_eos=True)):
        pass
""")


def kill_proxy(model: str, tp: int) -> dict:
    proxy = subprocess.Popen([sys.executable, "-c", PROXY, model, str(tp)], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    sid = json.loads(proxy.stdout.readline())["mpirun"]
    time.sleep(0.5)
    start = time.monotonic()
    proxy.kill()
    proxy.wait(10)
    while session_pids(sid) and time.monotonic() - start < 30:
        time.sleep(0.05)
    gone = time.monotonic() - start
    return {"workers_gone_s": gone, "orphans": leftovers(sid, 0.0), "ok": gone < 10}


def shutdown_in_flight(model: str, tp: int) -> dict:
    llm = LLM(model=model, tensor_parallel_size=tp, max_seq_len=4100, max_batch_size=8)
    sid = llm.workers.pid
    ended = []

    def consume(i: int) -> None:
        chunks = list(llm.generate_stream([5, 6, i], LONG))
        ended.append(chunks[-1].finished)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    start = time.monotonic()
    llm.shutdown()
    took = time.monotonic() - start
    for t in threads:
        t.join(10)
    return {"shutdown_s": took, "orphans": leftovers(sid), "ok": len(ended) == 16 and all(ended)}


def summarize(name: str, trials: list[dict]) -> str:
    keys = [k for k in trials[0] if k.endswith("_s")]
    cells = [f"{statistics.median(t[k] for t in trials):.2f} / {max(t[k] for t in trials):.2f}" for k in keys]
    return (f"| {name} | {len(trials)} | {sum(t['ok'] for t in trials)} | "
            + " ; ".join(f"{k}: {c}" for k, c in zip(keys, cells, strict=True))
            + f" | {sum(t['orphans'] for t in trials)} |")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--model", default=None, help="default: a tiny random Llama")
    p.add_argument("--doc", default="docs/reliability.md")
    p.add_argument("--only", default="", help="run only the scenarios whose name contains this")
    args = p.parse_args()
    model = args.model
    if model is None:
        from tpserve.model.default_model import cache_dir
        from tpserve.model.random_model import make_model

        path = cache_dir() / "bench-models" / "llama-tiny"
        if not (path / "config.json").exists():
            make_model(path, "llama", "tiny")
        model = str(path)
    scenarios = {
        "kill -9 rank 0": lambda: kill_rank(model, args.tp, 0),
        f"kill -9 rank {args.tp - 1}": lambda: kill_rank(model, args.tp, args.tp - 1),
        "kill -9 proxy": lambda: kill_proxy(model, args.tp),
        "shutdown, 16 streams in flight": lambda: shutdown_in_flight(model, args.tp),
    }
    rows = {}
    for name, fn in scenarios.items():
        if args.only and args.only not in name:
            continue
        trials = []
        for i in range(args.trials):
            trials.append(fn())
            print(name, i, trials[-1], flush=True)
        rows[name] = summarize(name, trials)
    for row in rows.values():
        print(row)
    update_doc(Path(args.doc), rows, "python scripts/stress_shutdown.py " + " ".join(sys.argv[1:]), args.tp)
    return 0


def update_doc(doc: Path, rows: dict[str, str], command: str, tp: int) -> None:
    """Replaces the rows of the scenarios run in the doc's table (the rest of the doc stays as it is)."""
    text = doc.read_text(encoding="utf-8")
    lines = text.splitlines()
    for name, row in rows.items():
        at = next((i for i, line in enumerate(lines) if line.startswith(f"| {name} |")), None)
        if at is None:  # a new scenario: after the table's last row
            at = max(i for i, line in enumerate(lines) if line.startswith("| kill -9") or line.startswith("|---|"))
            lines.insert(at + 1, row)
        else:
            lines[at] = row
    header = next(i for i, line in enumerate(lines) if line.startswith("Shutdown and death detection"))
    lines[header] = (f"Shutdown and death detection, repeated with real processes really killed (CPU, 2 cores, gloo, "
                     f"TP {tp}, a tiny random Llama). Last command: `{command}`.")
    doc.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())

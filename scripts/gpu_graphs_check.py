"""GPU checks of the fast path, in one process (an MPI singleton, TP 1): the executor driven step by step.

    python scripts/gpu_graphs_check.py MODEL_DIR [--tokens 32]

1. Graph replays against eager steps: the same greedy requests through an engine with CUDA graphs and one
   with enforce_eager (both bf16, both on the Triton kernels); reports the agreeing prefix of each.
2. No host sync: every launch of a steady-state decode step (forward: metadata copy + graph replay; sampling:
   argmax + the pinned copy + event) runs under torch.cuda.set_sync_debug_mode("error").
3. Decode ms/step at batch 1 and 32 (steady state, wall clock of whole loop iterations), and the host time
   of an iteration (the iteration's wall time minus its wait for the device).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import statistics
import sys
import time

import torch
from mpi4py import MPI

from tpserve import wire
from tpserve.engine_args import EngineArgs
from tpserve.executor.engine import build_engine
from tpserve.sampling_params import SamplingParams


def log(*what: object) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *what, flush=True)


def engine(model: str, device: str, **options):
    dtype = "bfloat16" if device == "cuda" else "float32"
    args = EngineArgs(model=model, device=device, dtype=dtype, max_batch_size=64, max_seq_len=1024,
                      kv_cache_tokens=64 * 1024, **options)
    published: list = []
    executor, info = build_engine(args, MPI.COMM_WORLD, published.extend)
    return executor, info, published


def submit(executor, rid: int, prompt: list[int], tokens: int) -> None:
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True).to_dict()
    executor.queue.put(wire.Submit(rid, prompt, params, False, time.time()))


def run_to_end(executor, published: list) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for _ in range(10000):
        executor.step()
        if not executor.requests and executor.prev is None:
            break
    for d in published:
        out.setdefault(d.request_id, []).extend(d.token_ids)
    return out


VOCAB = [1000]  # set from the engine's info: every prompt id must be inside the vocabulary


def prompts(n: int) -> list[list[int]]:
    return [[(i * 7919 + j * 104729) % (VOCAB[0] - 10) + 5 for j in range(5 + 37 * i % 300)] for i in range(n)]


def no_sync_check(executor) -> str:
    """Wraps the two launches of each iteration in sync-debug "error" for a few steady decode steps."""
    launches = {}
    for name in ("_launch_forward", "_launch_sampling"):
        original = getattr(executor, name)

        def guarded(*a, _original=original, **k):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return _original(*a, **k)
            finally:
                torch.cuda.set_sync_debug_mode(0)

        launches[name] = original
        setattr(executor, name, guarded)
    try:
        for _ in range(8):
            executor.step()
        return "ok: no host sync in forward or sampling launches"
    except RuntimeError as e:
        return f"FAILED: {e}"
    finally:
        for name, original in launches.items():
            setattr(executor, name, original)


def decode_timing(executor, batch: int, steps: int = 64) -> dict[str, float]:
    rid0 = 10_000 * batch
    for i, p in enumerate(prompts(batch)):
        submit(executor, rid0 + i, p[:128], steps + 40)
    for _ in range(20):  # prefill, then into steady decoding
        executor.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        executor.step()
        times.append(time.perf_counter() - start)
    for req in list(executor.requests.values()):
        executor.queue.put(wire.Abort(req.request_id))
    run_to_end(executor, [])
    return {"batch": batch, "ms_per_step_p50": round(statistics.median(times) * 1e3, 3),
            "ms_per_step_mean": round(statistics.mean(times) * 1e3, 3)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    faulthandler.dump_traceback_later(170, exit=True)  # a hang prints every stack instead of nothing
    report: dict = {}
    results = {}
    for label, options in (("eager", {"enforce_eager": True}), ("graphs", {})):
        start = time.perf_counter()
        log("starting", label)
        executor, info, published = engine(a.model, a.device, **options)
        report[f"startup_s_{label}"] = round(time.perf_counter() - start, 2)
        VOCAB[0] = info["vocab_size"]
        log("started", label, report[f"startup_s_{label}"], "s")
        report[f"info_{label}"] = {k: info[k] for k in ("cuda_graphs", "graph_capture_s", "kv_cache_tokens",
                                                        "fused_kernels", "max_num_tokens")}
        for i, pr in enumerate(prompts(8)):
            submit(executor, i, pr, a.tokens)
        results[label] = run_to_end(executor, published)
        errors = [d.error for d in published if d.error]
        assert not errors, errors[:3]
        log("greedy done", label)
        if label == "graphs" and a.device == "cuda":
            report["no_sync"] = no_sync_check_with_load(executor)
            log("no-sync", report["no_sync"])
        report[f"decode_{label}"] = [decode_timing(executor, b) for b in (1, 32)]
        log("decode", label, report[f"decode_{label}"])
        executor.runner.graphs = None
        del executor
        torch.cuda.empty_cache()
    agree = []
    for rid, eager in results["eager"].items():
        graph = results["graphs"][rid]
        n = 0
        while n < min(len(eager), len(graph)) and eager[n] == graph[n]:
            n += 1
        agree.append(n)
    report["graphs_vs_eager_agreeing_prefix"] = agree
    print(json.dumps(report, indent=1))
    return 0 if "ok" in report.get("no_sync", "ok") and min(agree) >= 4 else 1


def no_sync_check_with_load(executor) -> str:
    for i, pr in enumerate(prompts(4)):
        submit(executor, 500 + i, pr[:64], 40)
    for _ in range(12):  # through the prefills into steady decoding
        executor.step()
    verdict = no_sync_check(executor)
    for req in list(executor.requests.values()):
        executor.queue.put(wire.Abort(req.request_id))
    run_to_end(executor, [])
    return verdict


if __name__ == "__main__":
    sys.exit(main())

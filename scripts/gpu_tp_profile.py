"""Decode ms/step and the time of the tensor-parallel collectives per step, from a profile, at TP N.

    mpirun -n N python -m mpi4py scripts/gpu_tp_profile.py MODEL_DIR [--batch 1,32] [--enforce-eager]

Every rank builds the engine (bf16, CUDA graphs unless --enforce-eager) and steps the executor in lock-step;
rank 0 submits greedy requests of 128 prompt tokens. For each batch size: steady-state decode ms/step (wall
clock of whole loop iterations on rank 0), then a torch.profiler window over --profile-steps decode steps on
every rank: the device time of the NCCL kernels (the all-reduces and the LM head's all-gather) per step and
their count per step. A rank's collective time includes its wait for the slowest rank, so the smallest over
the ranks is the nearest to the transfers themselves. On CPU (gloo) the collectives' host time stands in.
Rank 0 prints one JSON report (and writes --json).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from mpi4py import MPI
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from tpserve import wire
from tpserve.engine_args import EngineArgs
from tpserve.executor.dist import destroy_tensor_parallel
from tpserve.executor.engine import build_engine
from tpserve.sampling_params import SamplingParams

PROMPT_LEN = 128
GLOO_COLLECTIVES = ("gloo:all_reduce", "gloo:all_gather")  # host-side ops: CPU stands in for the device


def step_until_idle(executor) -> None:
    """Steps until no request is left (bounded); every rank takes the same steps (the state is shared)."""
    for _ in range(10_000):
        if not executor.requests and executor.prev is None:
            return
        executor.step()
    raise RuntimeError("requests did not end within 10,000 steps")


def collective_time(prof, device: torch.device) -> tuple[float, int]:
    """(milliseconds, count) of the collectives in a profile: on CUDA the NCCL kernels only (the ops that
    launch them carry their kernels' device time too: counting both would count it twice; replays of a
    graph show the kernels without their ops), on CPU the host time of gloo's collectives."""
    total_us, count = 0.0, 0
    for e in prof.key_averages():
        if device.type == "cuda":
            hit = e.device_type == DeviceType.CUDA and "nccl" in e.key.lower()
            us = e.device_time_total
        else:
            hit = e.key.startswith(GLOO_COLLECTIVES)
            us = e.cpu_time_total
        if hit:
            total_us += us
            count += e.count
    return total_us / 1e3, count


def measure(executor, comm: MPI.Comm, batch: int, warm: int, steps: int, profile_steps: int, vocab: int) -> dict:
    rank = comm.Get_rank()
    if rank == 0:
        params = SamplingParams(max_tokens=warm + steps + profile_steps + 8, temperature=0,
                                ignore_eos=True).to_dict()
        for i in range(batch):
            prompt = [(i * 7919 + j * 104729) % (vocab - 10) + 5 for j in range(PROMPT_LEN)]
            executor.queue.put(wire.Submit(batch * 10_000 + i, prompt, params, False, time.time()))
    for _ in range(warm):
        executor.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        executor.step()
        times.append(time.perf_counter() - start)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if executor.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(profile_steps):
            executor.step()
        if executor.device.type == "cuda":
            torch.cuda.synchronize(executor.device)
    ms, count = collective_time(prof, executor.device)
    per_rank = comm.gather((ms / profile_steps, count / profile_steps), root=0)
    assert len(executor.requests) == batch, "a request ended early: the measured steps were not all decodes"
    if rank == 0:
        for rid in list(executor.requests):
            executor.queue.put(wire.Abort(rid))
    step_until_idle(executor)
    if rank != 0:
        return {}
    ms_per_step = statistics.median(times) * 1e3
    least = min(ms for ms, _ in per_rank)
    return {
        "batch": batch,
        "ms_per_step_p50": round(ms_per_step, 3),
        "ms_per_step_mean": round(statistics.mean(times) * 1e3, 3),
        "collective_ms_per_step_by_rank": [round(ms, 3) for ms, _ in per_rank],
        "collectives_per_step": per_rank[0][1],
        "collective_share_of_step_min_rank": round(least / ms_per_step, 3),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    p.add_argument("--warm-steps", type=int, default=20, help="steps into steady decoding (the prefill first)")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps per batch size")
    p.add_argument("--profile-steps", type=int, default=16)
    p.add_argument("--device", default="cuda")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    faulthandler.dump_traceback_later(540, exit=True)  # a hang prints every stack instead of nothing
    comm = MPI.COMM_WORLD
    max_seq_len = PROMPT_LEN + a.warm_steps + a.steps + a.profile_steps + 16
    args = EngineArgs(model=a.model, device=a.device, dtype="bfloat16" if a.device == "cuda" else "float32",
                      max_batch_size=max(a.batch), max_seq_len=max_seq_len,
                      kv_cache_tokens=max(a.batch) * max_seq_len, enforce_eager=a.enforce_eager)
    start = time.perf_counter()
    executor, info = build_engine(args, comm, lambda deltas: None)
    report = {"tp": comm.Get_size(), "model": a.model, "startup_s": round(time.perf_counter() - start, 2),
              **{k: info[k] for k in ("device", "dtype", "cuda_graphs", "graph_capture_s", "fused_kernels")}}
    if a.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name(executor.device)
    report["decode"] = [measure(executor, comm, b, a.warm_steps, a.steps, a.profile_steps, info["vocab_size"]) for b in a.batch]
    executor.queue.close()  # the worker's teardown order: queue, graphs, process group, barrier
    if executor.runner.graphs is not None:
        torch.cuda.synchronize(executor.device)
        executor.runner.graphs.close()
    destroy_tensor_parallel()
    comm.Barrier()
    if comm.Get_rank() == 0:
        print(json.dumps(report, indent=1), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

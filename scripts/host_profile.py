"""Host time of one steady decode iteration, by part: what the overlap loop must hide behind a GPU step.

    python scripts/host_profile.py [--model DIR] [--batch 1,32,256] [--iterations 200] [--temperature 0]

The real engine of one rank (``build_engine``: model, KV pool, scheduler, runner, sampler, CUDA graphs on a
GPU) runs in this process; each part of an iteration is timed by wrapping the function that does it, and the
publish callback encodes and signs each Outputs frame as rank 0 does before its socket send. Parts:
fetch (the queue), schedule, inputs (token ids, block tables, the packed step inputs), launch (the copy to
the device and the graph replay or eager forward: on a CPU the forward's compute itself), sample (launching
the sampler and the copy of the ids), update (tokens into requests, stop checks: the wait for the device
excluded, shown as "wait"), publish (deltas, stats, frame). "host" is the iteration less the wait.
Prints medians in microseconds per iteration, on CPU and on GPU alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from mpi4py import MPI

from tpserve import wire
from tpserve.engine_args import EngineArgs
from tpserve.executor import engine as engine_mod
from tpserve.sampling_params import SamplingParams

PARTS = ("fetch", "schedule", "inputs", "launch", "sample", "update", "wait", "publish")


class Clock:
    """Per-part seconds of the current iteration; nested parts are subtracted from the part around them."""

    def __init__(self) -> None:
        self.now: dict[str, float] = defaultdict(float)
        self.stack: list[list[float]] = []

    def wrap(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.stack.append([0.0])
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                inner = self.stack.pop()[0]
                self.now[part] += spent - inner
                if self.stack:
                    self.stack[-1][0] += spent
        return timed


class TimedEvent:
    """A CUDA event whose host wait is timed as "wait" (the device's time, not the host's)."""

    def __init__(self, event: torch.cuda.Event, clock: Clock) -> None:
        self.event = event
        self.synchronize = clock.wrap("wait", event.synchronize)
        self.query = event.query


def instrument(executor: Any, clock: Clock) -> None:
    runner = executor.runner
    executor.queue.fetch = clock.wrap("fetch", executor.queue.fetch)
    executor.scheduler.schedule = clock.wrap("schedule", executor.scheduler.schedule)
    runner.forward = clock.wrap("launch", runner.forward)
    runner.step_tokens = clock.wrap("inputs", runner.step_tokens)
    runner.step_tables = clock.wrap("inputs", runner.step_tables)
    if runner.graphs is not None:
        runner.graphs.layout.fill = clock.wrap("inputs", runner.graphs.layout.fill)
    executor._launch_sampling = clock.wrap("sample", executor._launch_sampling)
    executor._update = clock.wrap("update", executor._update)
    executor._publish = clock.wrap("publish", executor._publish)
    new_event = executor.new_event

    def event() -> Any:
        e = new_event()
        return None if e is None else TimedEvent(e, clock)

    executor.new_event = event


def frame_publisher(executor_ref: list[Any]) -> Callable[[list], None]:
    """Rank 0's work per publish before the socket: the deltas and stats into a signed Outputs frame."""
    codec = wire.Codec(b"k" * 32)
    seq = [0]

    def publish(deltas: list) -> None:
        stats = executor_ref[0].stats() if executor_ref else None
        if deltas or stats:
            seq[0] += 1
            codec.encode(wire.Outputs([d.to_dict() for d in deltas], stats), b"session", seq[0])
    return publish


def measure(args: argparse.Namespace, batch: int) -> dict[str, float]:
    engine_args = EngineArgs(model=args.model, max_batch_size=max(batch, 1), max_seq_len=args.max_seq_len,
                             device=args.device)
    executor_ref: list[Any] = []
    executor, info = engine_mod.build_engine(engine_args, MPI.COMM_WORLD, frame_publisher(executor_ref))
    executor_ref.append(executor)
    clock = Clock()
    instrument(executor, clock)
    params = SamplingParams(max_tokens=args.max_seq_len - 200, temperature=args.temperature, top_p=args.top_p,
                            ignore_eos=True, seed=1 if args.temperature else None).to_dict()
    vocab = info["vocab_size"]
    for i in range(batch):
        prompt = [(i * 131 + j * 7) % (vocab - 10) + 5 for j in range(128)]
        executor.queue.put(wire.Submit(i, prompt, params, True))
    for _ in range(40):  # prompts, then steady decodes
        executor.step()
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.iterations):
        clock.now.clear()
        start = time.perf_counter()
        executor.step()
        total = time.perf_counter() - start
        for part in PARTS:
            samples[part].append(clock.now.get(part, 0.0))
        samples["other"].append(total - sum(clock.now.values()))
        samples["host"].append(total - clock.now.get("wait", 0.0))
        samples["iteration"].append(total)
    assert len(executor.scheduler.running) == batch, "not a steady decode of the whole batch"
    executor.queue.put(wire.Shutdown(drain=False))
    while not executor.done:
        executor.step()
    if executor.runner.graphs is not None:
        executor.runner.graphs.close()
    return {k: statistics.median(v) * 1e6 for k, v in samples.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: a small random-weight Qwen3 built "
                   "here on CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", default="1,32,256")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    a = p.parse_args()
    if a.model is None:
        from tpserve.model.random_model import make_model

        a.model = tempfile.mkdtemp(prefix="tpserve-profile-")
        make_model(a.model, "qwen3", "small")
    rows = {b: measure(a, b) for b in map(int, a.batch.split(","))}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and a.device != "cpu" else "CPU"
    print(f"host time per steady decode iteration, us (median of {a.iterations}), {device}, model {a.model}, "
          f"temperature {a.temperature}, top_p {a.top_p}")
    cols = ["batch", *PARTS, "other", "host", "iteration"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for b, r in rows.items():
        print("| " + " | ".join([str(b)] + [f"{r[c]:.0f}" for c in cols[1:]]) + " |")


if __name__ == "__main__":
    main()

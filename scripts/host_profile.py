"""Host time of one loop iteration at steady decode: what the overlap loop must hide behind a GPU step.

    python scripts/host_profile.py [--batch 1,32] [--iterations 300] [--top 12]

The real executor, scheduler, block manager, sampler and metadata packing (``AttentionMetadata.build``) run
on this machine's CPU; only the forward itself is left out (it returns fixed logits over a 1,024-token
vocabulary at once), so the time measured is the Python work of an iteration: fetch, schedule, metadata,
launch bookkeeping, update, publish. Prints microseconds per iteration and the functions that take it.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch

from tpserve import wire
from tpserve.executor.block_manager import BlockManager
from tpserve.executor.executor import Executor, ExecutorConfig
from tpserve.executor.sampler import Sampler
from tpserve.executor.scheduler import ScheduledBatch, Scheduler
from tpserve.model import AttentionMetadata
from tpserve.sampling_params import SamplingParams

VOCAB = 1024


class MetadataOnlyRunner:
    """Builds each step's inputs exactly as ModelRunner does, then returns fixed logits (no model)."""

    def __init__(self, blocks: BlockManager) -> None:
        self.blocks = blocks

    def forward(self, batch: ScheduledBatch, prev_tokens=None, prev_rows=None) -> torch.Tensor:
        AttentionMetadata.build(
            [self.blocks.table_view(s.request.request_id) for s in batch.seqs],
            [s.start_pos for s in batch.seqs], [s.num_tokens for s in batch.seqs], self.blocks.block_size,
            "cpu", input_ids=[0] * sum(s.num_tokens for s in batch.seqs))
        logits = torch.zeros(len(batch), VOCAB)
        logits[:, 7] = 1.0
        return logits


class Queue:
    def __init__(self) -> None:
        self.items: list[wire.Message] = []

    def fetch(self, idle: bool) -> list[wire.Message]:
        items, self.items = self.items, []
        return items


def measure(batch: int, iterations: int, top: int) -> None:
    blocks = BlockManager(4096, 16)
    config = ExecutorConfig(VOCAB, 4096, (), stream_interval=1)
    executor = Executor(config, Queue(), Scheduler(blocks, 256, 8192), MetadataOnlyRunner(blocks),
                        Sampler(torch.device("cpu"), 0), lambda deltas: None, torch.device("cpu"))
    params = SamplingParams(max_tokens=2 * iterations + 100, temperature=0, ignore_eos=True).to_dict()
    for i in range(batch):
        executor.queue.items.append(wire.Submit(i, [5 + (i * 31 + j) % 1000 for j in range(128)], params, True))
    for _ in range(20):
        executor.step()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        executor.step()
        times.append(time.perf_counter() - start)
    print(f"batch {batch}: host time per decode iteration p50 {statistics.median(times) * 1e6:.0f} us, "
          f"mean {statistics.mean(times) * 1e6:.0f} us; where it goes (under cProfile, which inflates it):")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(iterations):
        executor.step()
    profiler.disable()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(top)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", default="1,32")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--top", type=int, default=12)
    a = p.parse_args()
    torch.set_num_threads(1)
    for b in map(int, a.batch.split(",")):
        measure(b, a.iterations, a.top)


if __name__ == "__main__":
    main()

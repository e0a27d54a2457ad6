"""Host time of a graphed step's inputs, no GPU needed: gathering its block tables from the block manager's
rows (ModelRunner.step_tables) and filling the static inputs (cuda_graphs.StepLayout.fill). The Qwen3-0.6B
shape's default context (rows of 2,560 blocks of 16), batch 256, max_num_tokens 8192, 600-token contexts.
Then a steady decode step's schedule at batch 256 (Scheduler.schedule): its one-pass shortcut beside the full
schedule, alternately.

    python scripts/step_fill_time.py
"""

from __future__ import annotations

import time

import numpy as np

from tpserve.executor.block_manager import BlockManager
from tpserve.executor.cuda_graphs import GraphPicker, StepLayout, graph_keys
from tpserve.executor.request import Request
from tpserve.executor.scheduler import Scheduler
from tpserve.sampling_params import SamplingParams


def schedule_time(steady: bool, batch: int = 256, steps: int = 300) -> float:
    """Median us of schedule() over steady decode steps of ``batch`` requests (overlap: a token pending)."""
    blocks = BlockManager(batch * 80 + 10, 16, max_seqs=batch, max_blocks_per_seq=80)
    scheduler = Scheduler(blocks, batch, 8192)
    if not steady:
        scheduler._steady_decode = lambda: None
    for i in range(batch):
        scheduler.add(Request(i, [5 + i] * 128, SamplingParams(max_tokens=1000, ignore_eos=True), True))
    pending: list[Request] = []
    times = []
    for _ in range(steps):
        for req in pending:
            req.num_pending -= 1
            req.output_token_ids.append(7)
        start = time.perf_counter()
        batch_ = scheduler.schedule()
        times.append(time.perf_counter() - start)
        pending = [s.request for s in batch_.seqs if s.samples]
        for req in pending:
            req.num_pending += 1
    return float(np.median(times[50:]) * 1e6)


def main() -> None:
    layout = StepLayout(8192, 256, 2560, 16)
    buf = np.zeros(layout.size, dtype=np.int32)
    pick = GraphPicker(graph_keys(256, 8192))
    rows = np.zeros((256, 2560), dtype=np.int32)
    for i in range(256):
        rows[i, :40] = np.arange(1 + i * 40, 41 + i * 40)
    for num_seqs, chunk in ((1, 128), (32, 512), (256, 0)):
        qlens = np.array([1] * (num_seqs - 1) + [chunk or 1])
        starts = np.array([600] * (num_seqs - 1) + [0])
        ids = np.arange(qlens.sum())
        index = np.arange(num_seqs)
        key = pick(int(qlens.sum()), num_seqs)
        start = time.perf_counter()
        for _ in range(200):
            w = -(-int((starts + qlens).max()) // 16)
            layout.fill(buf, key, rows[index, :w], starts, qlens, ids, [])
        what = f"{num_seqs - 1} decodes + a {chunk}-token chunk" if chunk else f"{num_seqs} decodes"
        print(f"{what} -> graph {key}: "
              f"{(time.perf_counter() - start) / 200 * 1e6:.0f} us per fill")
    runs = {True: [], False: []}
    for _ in range(3):
        for steady in (True, False):
            runs[steady].append(schedule_time(steady))
    print(f"steady decode schedule, batch 256: shortcut {np.median(runs[True]):.0f} us, full schedule "
          f"{np.median(runs[False]):.0f} us (median of 3 alternate runs)")


if __name__ == "__main__":
    main()

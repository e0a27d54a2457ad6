"""Host time of a graphed step's inputs, no GPU needed: gathering its block tables from the block manager's
rows (ModelRunner.step_tables) and filling the static inputs (cuda_graphs.StepLayout.fill). The Qwen3-0.6B
shape's default context (rows of 2,560 blocks of 16), batch 256, max_num_tokens 8192, 600-token contexts.

    python scripts/step_fill_time.py
"""

from __future__ import annotations

import time

import numpy as np

from tpserve.executor.cuda_graphs import GraphPicker, StepLayout, graph_keys


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


if __name__ == "__main__":
    main()

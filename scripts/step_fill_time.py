"""Host time of filling one graphed step's static inputs (cuda_graphs.StepLayout.fill), no GPU needed: the
Qwen3-0.6B shape's default context (2,560 blocks of 16 per block table), batch 256, max_num_tokens 8192.

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
    for num_seqs, chunk in ((1, 128), (32, 512), (256, 0)):
        tables = [list(range(1 + i * 40, 41 + i * 40)) for i in range(num_seqs)]
        qlens = [1] * (num_seqs - 1) + [chunk or 1]
        starts = [600] * (num_seqs - 1) + [0]
        ids = list(range(sum(qlens)))
        key = pick(sum(qlens), num_seqs)
        start = time.perf_counter()
        for _ in range(200):
            layout.fill(buf, key, tables, starts, qlens, ids, [])
        what = f"{num_seqs - 1} decodes + a {chunk}-token chunk" if chunk else f"{num_seqs} decodes"
        print(f"{what} -> graph {key}: "
              f"{(time.perf_counter() - start) / 200 * 1e6:.0f} us per fill")


if __name__ == "__main__":
    main()

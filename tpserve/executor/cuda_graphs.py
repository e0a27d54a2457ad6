"""CUDA graphs of the decode step, one per batch-size bucket, captured at start-up into one memory pool.

A decode step launches hundreds of small kernels; replaying them as one graph takes the host out of the
step. Every input lives in a static device buffer that a replay reads: token ids, positions, seq_lens,
slot_mapping and block tables (one packed int32 buffer, filled by one copy from a double-buffered pinned
host buffer), and the LM head's logits are the graph's static output. Rows past the batch (up to the
bucket) are padding: position 0, one token of context, block 0 (reserved), so they write nowhere that
matters. Every rank picks the same bucket: it follows from the batch size, which every rank shares.
"""

from __future__ import annotations

import numpy as np
import torch

from tpserve.executor.block_manager import BlockManager
from tpserve.executor.scheduler import ScheduledBatch
from tpserve.model import AttentionMetadata, KVCache, LlamaForCausalLM

BASE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def bucket_sizes(max_batch_size: int) -> list[int]:
    """Batch sizes to capture: powers of two, then steps of 32 above 64, up to and including max_batch_size."""
    sizes = [b for b in BASE_BUCKETS if b < max_batch_size]
    sizes += list(range(256 + 64, max_batch_size, 64))
    return [*sizes, max_batch_size]


def pick_bucket(buckets: list[int], n: int) -> int | None:
    """The smallest bucket that holds n rows (None: more rows than the largest graph)."""
    return next((b for b in buckets if b >= n), None)


class DecodeGraphs:
    def __init__(self, model: LlamaForCausalLM, kv: KVCache, blocks: BlockManager, max_batch_size: int,
                 max_seq_len: int, device: torch.device) -> None:
        self.model = model
        self.kv = kv
        self.blocks = blocks
        self.device = device
        self.buckets = bucket_sizes(max_batch_size)
        n = self.max_rows = self.buckets[-1]
        self.width = -(-max_seq_len // blocks.block_size)  # blocks per sequence: the block tables' width
        # Packed layout, one region per input: ids, positions, seq_lens, slots, gather index (rows of the
        # batch whose token comes from the previous step's device tensor), then the [n, width] block tables.
        names = ("ids", "positions", "seq_lens", "slots", "where", "src")
        self.regions = {name: slice(i * n, (i + 1) * n) for i, name in enumerate(names)}
        self.tables_at = len(names) * n
        size = self.tables_at + n * self.width
        self.packed = torch.zeros(size, dtype=torch.int32, device=device)
        self.staging = [torch.zeros(size, dtype=torch.int32).pin_memory() for _ in range(2)]
        self.turn = 0
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def view(self, name: str, b: int) -> torch.Tensor:
        return self.packed[self.regions[name]][:b]

    def metadata(self, b: int) -> AttentionMetadata:
        """Views of the static buffers for a bucket of b rows (the same memory at capture and replay)."""
        n = self.max_rows
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.view("seq_lens", b),
            block_tables=self.packed[self.tables_at :].view(n, self.width)[:b],
            slot_mapping=self.view("slots", b),
            last_token_index=self.query_start_loc[:b],
            num_decodes=b,
            max_query_len=1,
            max_decode_seq_len=self.width * self.blocks.block_size,
            max_prefill_seq_len=0,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures every bucket, largest first, into one pool; each is run once first (kernel compilation,
        cuBLAS workspaces) with the padding inputs, which write only block 0."""
        self.packed[self.regions["seq_lens"]].fill_(1)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for b in reversed(self.buckets):
                args = (self.view("ids", b), self.view("positions", b), self.metadata(b), self.kv)
                self.model(*args)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.logits[b] = self.model(*args)
                self.graphs[b] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)

    def fits(self, batch: ScheduledBatch) -> bool:
        return len(batch) <= self.max_rows and all(s.num_tokens == 1 for s in batch.seqs)

    def run(self, batch: ScheduledBatch, ids: list[int], from_device: list[tuple[int, int]],
            prev_tokens: torch.Tensor | None) -> torch.Tensor:
        """Fills the static inputs for this decode batch (one pinned copy) and replays its bucket's graph;
        returns the logits of the batch's rows (a view of the graph's output, valid until the next replay,
        which the stream orders after this step's sampling)."""
        rows = len(batch)
        b = pick_bucket(self.buckets, rows)
        assert b is not None
        host = self.staging[self.turn]
        self.turn ^= 1
        buf = host.numpy()
        bs = self.blocks.block_size
        positions = np.fromiter((s.start_pos for s in batch.seqs), dtype=np.int64, count=rows)
        tables = buf[self.tables_at : self.tables_at + b * self.width].reshape(b, self.width)
        tables[:] = 0
        for i, seq in enumerate(batch.seqs):
            table = self.blocks.table_view(seq.request.request_id)
            tables[i, : len(table)] = table
        r = self.regions
        buf[r["ids"]][:rows] = ids
        buf[r["ids"]][rows:b] = 0
        buf[r["positions"]][:rows] = positions
        buf[r["positions"]][rows:b] = 0
        buf[r["seq_lens"]][:rows] = positions + 1
        buf[r["seq_lens"]][rows:b] = 1
        buf[r["slots"]][:rows] = tables[np.arange(rows), positions // bs] * bs + positions % bs
        buf[r["slots"]][rows:b] = 0
        f = len(from_device)
        if f:
            buf[r["where"]][:f] = [w for w, _ in from_device]
            buf[r["src"]][:f] = [s for _, s in from_device]
        end = self.tables_at + b * self.width
        self.packed[:end].copy_(host[:end], non_blocking=True)
        if f:  # tokens the previous step sampled, still on the device: gathered there, no sync
            assert prev_tokens is not None
            src = prev_tokens.index_select(0, self.packed[r["src"]][:f])
            self.packed[r["ids"]].index_copy_(0, self.packed[r["where"]][:f].long(), src.int())
        self.graphs[b].replay()
        return self.logits[b][:rows]

    def close(self) -> None:
        """Graphs go before the process group and the pool (the order the NCCL pitfalls call for)."""
        self.graphs.clear()
        self.logits.clear()

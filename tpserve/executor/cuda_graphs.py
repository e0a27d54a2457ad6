"""CUDA graphs of every step, captured at start-up into one memory pool: decodes and steps with prompt tokens.

A step launches hundreds of small kernels; replaying them as one graph takes the host out of the step. Two
kinds of graph, each keyed by a bucket (``GraphKey``):
- uniform decode (every sequence brings one token), one per batch-size bucket: the split-KV decode kernel;
- any step with prompt tokens (pure prefill, or running decodes beside prompt chunks), one per (token
  bucket, sequence bucket): "full" graphs, whose varlen attention kernel takes every size from device
  metadata (``AttentionMetadata.padded``), so one graph serves any mix that fits its bucket.
Every input lives in one static packed int32 buffer (``StepLayout``), filled by one copy from a
double-buffered pinned host buffer; every graph writes its logits into one shared static output.
Padding: tokens past the step's are id 0 at position 0 and write to slot 0 of block 0 (reserved, so they
write nowhere that matters); padded decode rows are one-token sequences over block 0; padded sequences of a
prompt graph have no query. Every rank picks the same graph: the key follows from the batch's shape,
which every rank shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tpserve.executor.block_manager import BlockManager
from tpserve.executor.scheduler import ScheduledBatch
from tpserve.model import AttentionMetadata, KVCache, LlamaForCausalLM
from tpserve.model.attention import token_layout

DECODE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
MIN_TOKEN_BUCKET = 16
SEQ_BUCKET_BASE = 4  # sequence buckets of prompt graphs: 4, 16, 64, 256, ... (each 4x the last)


def decode_buckets(max_batch_size: int) -> list[int]:
    """Batch sizes of the decode graphs: 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, then steps of 32 up to 256 and
    of 64 above, up to and including max_batch_size."""
    sizes = [b for b in DECODE_BUCKETS if b < max_batch_size]
    sizes += list(range(256 + 64, max_batch_size, 64))
    return [*sizes, max_batch_size]


def token_buckets(max_num_tokens: int) -> list[int]:
    """Token counts of the prompt graphs: 16, 24, 32, 48, 64, 96, ... (powers of two and the halfway steps
    between, so padding costs at most a third of a step), up to and including max_num_tokens."""
    sizes, p = [], MIN_TOKEN_BUCKET
    while p < max_num_tokens:
        sizes += [b for b in (p, p + p // 2) if b < max_num_tokens and b >= MIN_TOKEN_BUCKET]
        p *= 2
    return sorted({*sizes, max(max_num_tokens, 1)})


def seq_buckets(tokens: int, max_batch_size: int) -> list[int]:
    """Sequence counts of the prompt graphs of one token bucket: 4, 16, 64, ... below min(tokens, batch),
    then that cap (a step has at most one sequence a token). Few sequences keep the LM head's rows and the
    empty programs of the attention grid few; the attention tile follows (policy.varlen_block_m)."""
    cap = min(tokens, max_batch_size)
    sizes, b = [], SEQ_BUCKET_BASE
    while b < cap:
        sizes.append(b)
        b *= 4
    return [*sizes, cap]


def pick_bucket(buckets: Sequence[int], n: int) -> int | None:
    """The smallest bucket that holds n (None: more than the largest)."""
    return next((b for b in buckets if b >= n), None)


@dataclass(frozen=True, order=True)
class GraphKey:
    tokens: int  # new tokens in the graph's step (padding included)
    seqs: int  # sequences (padding included)
    decode: bool  # uniform decode: the split-KV kernel; else the padded varlen kernel


def graph_keys(max_batch_size: int, max_num_tokens: int) -> list[GraphKey]:
    """Every graph captured for this configuration, largest first (the capture order: one pool)."""
    keys = [GraphKey(b, b, True) for b in decode_buckets(max_batch_size)]
    keys += [GraphKey(t, s, False) for t in token_buckets(max_num_tokens) for s in seq_buckets(t, max_batch_size)]
    return sorted(keys, key=lambda k: (k.tokens, k.seqs), reverse=True)


class GraphPicker:
    """The graph for a step of T new tokens over S sequences: the smallest decode bucket when every sequence
    brings one token, else the prompt graph of the smallest token bucket holding T and, within it, of the
    smallest sequence bucket holding S. None when no graph holds the step (it runs eagerly)."""

    def __init__(self, keys: Sequence[GraphKey]) -> None:
        self.decode = sorted(k.seqs for k in keys if k.decode)
        self.tokens = sorted({k.tokens for k in keys if not k.decode})
        self.seqs = {t: sorted(k.seqs for k in keys if not k.decode and k.tokens == t) for t in self.tokens}

    def __call__(self, num_tokens: int, num_seqs: int) -> GraphKey | None:
        if num_tokens == num_seqs:
            b = pick_bucket(self.decode, num_seqs)
            return None if b is None else GraphKey(b, b, True)
        for t in self.tokens:
            if t >= num_tokens:
                s = pick_bucket(self.seqs[t], num_seqs)
                if s is not None:
                    return GraphKey(t, s, False)
        return None


def table_array(tables: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    """Block tables as an int array [S, W]: an array as it is, lists zero-padded to the longest."""
    if isinstance(tables, np.ndarray):
        return tables
    width = max((len(t) for t in tables), default=1) or 1
    out = np.zeros((len(tables), width), dtype=np.int32)
    for i, table in enumerate(tables):
        out[i, : len(table)] = table
    return out


class StepLayout:
    """Where each input of a graphed step lives in the packed int32 buffer, and how a step fills it.

    Regions, each at a fixed offset: ids, positions and slots [max_tokens]; query_start_loc [max_seqs + 1];
    seq_lens, last_token_index, and the gather index of tokens still on the device (``where`` in ids, ``src``
    row of the previous step's tokens) [max_seqs]; the count of leading one-token sequences (a prompt graph's
    decodes, which its decode kernel takes) [1]; block tables last. On the device the tables are
    [max_seqs, width] (the graphs' static shape: width covers max_seq_len); a step sends only its own rows and
    only as many columns as its longest sequence needs (``w``, bucketed by the caller), packed [S, w] in the
    host buffer: the kernels never read a column past a sequence's own blocks."""

    def __init__(self, max_tokens: int, max_seqs: int, width: int, block_size: int) -> None:
        self.width = width
        self.block_size = block_size
        sizes = {"ids": max_tokens, "positions": max_tokens, "slots": max_tokens, "qsl": max_seqs + 1,
                 "seq_lens": max_seqs, "last": max_seqs, "where": max_seqs, "src": max_seqs, "decodes": 1}
        self.regions: dict[str, slice] = {}
        at = 0
        for name, n in sizes.items():
            self.regions[name] = slice(at, at + n)
            at += n
        self.tables_at = at
        self.size = at + max_seqs * width

    def tables(self, buf: np.ndarray | torch.Tensor, seqs: int, width: int | None = None
               ) -> np.ndarray | torch.Tensor:
        """The tables region as [seqs, width] (default: the device's full width)."""
        width = width or self.width
        return buf[self.tables_at : self.tables_at + seqs * width].reshape(seqs, width)

    def fill(self, buf: np.ndarray, key: GraphKey, tables: Sequence[Sequence[int]] | np.ndarray,
             starts: Sequence[int], qlens: Sequence[int], ids: Sequence[int] | np.ndarray,
             from_device: Sequence[tuple[int, int]] | np.ndarray) -> int:
        """Writes a step of S = len(qlens) sequences into the host buffer, padded to the key's bucket, its
        tables [S, w] packed [key.seqs, w]; returns w. A table wider than the graphs' is refused here, where
        the copy happens (the block manager refuses such a table first: its request fails alone)."""
        s = len(qlens)
        table = table_array(tables)
        w = table.shape[1] if s else 1
        if w > self.width:
            raise ValueError(f"a block table of {w} blocks exceeds the graphs' {self.width}")
        t = int(np.sum(qlens)) if s else 0
        view = {name: buf[sl] for name, sl in self.regions.items()}
        qlen = np.asarray(qlens, dtype=np.int64)
        start = np.asarray(starts, dtype=np.int64)
        rows = self.tables(buf, key.seqs, w)
        rows[:s] = table[:, :w]
        rows[s:] = 0
        qsl = view["qsl"]
        qsl[: s + 1], view["positions"][:t], view["slots"][:t] = token_layout(rows, start, qlen, self.block_size)
        view["ids"][:t] = ids
        view["seq_lens"][:s] = start + qlen
        view["last"][:s] = qsl[1 : s + 1] - 1
        for name in ("ids", "positions", "slots"):
            view[name][t : key.tokens] = 0
        if key.decode:  # padded rows: one token each at position 0 over block 0
            qsl[s + 1 : key.seqs + 1] = np.arange(s + 1, key.seqs + 1)
            view["seq_lens"][s : key.seqs] = 1
            view["last"][s : key.seqs] = np.arange(s, key.seqs)
        else:  # padded sequences: no query; padded tokens: no sequence
            qsl[s + 1 : key.seqs + 1] = t
            view["seq_lens"][s : key.seqs] = 0
            view["last"][s : key.seqs] = 0
            view["decodes"][0] = int(np.argmax(qlen != 1)) if (qlen != 1).any() else s
        f = len(from_device)
        if f:
            pairs = np.asarray(from_device).reshape(f, 2)
            view["where"][:f] = pairs[:, 0]
            view["src"][:f] = pairs[:, 1]
        return w

    def send(self, host: torch.Tensor, packed: torch.Tensor, seqs: int, w: int, non_blocking: bool) -> None:
        """Copies a filled host buffer to the device layout: the regions before the tables, and the step's
        [seqs, w] tables into the first w columns of the device's [seqs, width] rows."""
        packed[: self.tables_at].copy_(host[: self.tables_at], non_blocking=non_blocking)
        src = self.tables(host, seqs, w)
        dst = self.tables(packed, seqs)
        (dst if w == self.width else dst[:, :w]).copy_(src, non_blocking=non_blocking)

    def inputs(self, packed: torch.Tensor, key: GraphKey) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input ids, positions, metadata): views of the packed buffer for a key's bucket, the same memory
        at capture and at every replay."""
        r, t, s = self.regions, key.tokens, key.seqs
        meta = AttentionMetadata(
            query_start_loc=packed[r["qsl"]][: s + 1],
            seq_lens=packed[r["seq_lens"]][:s],
            block_tables=self.tables(packed, s),
            slot_mapping=packed[r["slots"]][:t],
            last_token_index=packed[r["last"]][:s],
            num_decodes=s if key.decode else 0,
            max_query_len=1 if key.decode else t,
            max_decode_seq_len=self.width * self.block_size if key.decode else 0,
            max_prefill_seq_len=0 if key.decode else self.width * self.block_size,
            padded=not key.decode,
            decodes_on_device=None if key.decode else packed[r["decodes"]],
        )
        return packed[r["ids"]][:t], packed[r["positions"]][:t], meta


class CudaGraphs:
    """The captured graphs of one rank, their static inputs and their one shared logits output."""

    def __init__(self, model: LlamaForCausalLM, kv: KVCache, blocks: BlockManager, max_batch_size: int,
                 max_num_tokens: int, max_seq_len: int, device: torch.device) -> None:
        self.model = model
        self.kv = kv
        self.blocks = blocks
        self.device = device
        self.keys = graph_keys(max_batch_size, max_num_tokens)
        self.picker = GraphPicker(self.keys)
        width = -(-max_seq_len // blocks.block_size)  # blocks per sequence: the block tables' width
        max_tokens = max(k.tokens for k in self.keys)
        self.layout = StepLayout(max_tokens, max_batch_size, width, blocks.block_size)
        self.packed = torch.zeros(self.layout.size, dtype=torch.int32, device=device)
        self.staging = [torch.zeros(self.layout.size, dtype=torch.int32).pin_memory() for _ in range(2)]
        self.turn = 0
        self.logits = torch.zeros(max_batch_size, model.config.vocab_size, dtype=torch.float32, device=device)
        self.graphs: dict[GraphKey, torch.cuda.CUDAGraph] = {}

    @property
    def decode_buckets(self) -> list[int]:
        return sorted(k.seqs for k in self.keys if k.decode)

    @property
    def prompt_buckets(self) -> list[list[int]]:
        return sorted([k.tokens, k.seqs] for k in self.keys if not k.decode)

    def _forward(self, key: GraphKey) -> None:
        ids, positions, meta = self.layout.inputs(self.packed, key)
        self.model(ids, positions, meta, self.kv, logits_out=self.logits[: key.seqs])

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures every graph, largest first, into one pool; each is run once first (kernel compilation,
        cuBLAS workspaces) on an all-padding step, which writes only block 0."""
        host = self.staging[0].numpy()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for key in self.keys:
                w = self.layout.fill(host, key, [], [], [], [], [])
                self.layout.send(self.staging[0], self.packed, key.seqs, w, non_blocking=False)
                self._forward(key)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._forward(key)
                self.graphs[key] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)

    def pick(self, batch: ScheduledBatch) -> GraphKey | None:
        return self.picker(sum(s.num_tokens for s in batch.seqs), len(batch.seqs))

    def replay(self, key: GraphKey, tables: Sequence[Sequence[int]] | np.ndarray, starts: Sequence[int],
               qlens: Sequence[int], ids: Sequence[int] | np.ndarray,
               from_device: Sequence[tuple[int, int]] | np.ndarray,
               prev_tokens: torch.Tensor | None) -> torch.Tensor:
        """Fills the static inputs for this step (one pinned copy, and one of its tables' columns) and replays
        its graph; returns the logits of the step's sequences (a view of the shared output, valid until the
        next replay, which the stream orders after this step's sampling)."""
        host = self.staging[self.turn]
        self.turn ^= 1
        w = self.layout.fill(host.numpy(), key, tables, starts, qlens, ids, from_device)
        self.layout.send(host, self.packed, key.seqs, w, non_blocking=True)
        f = len(from_device)
        if f:  # tokens the previous step sampled, still on the device: gathered there, no sync
            assert prev_tokens is not None
            r = self.layout.regions
            src = prev_tokens.index_select(0, self.packed[r["src"]][:f])
            self.packed[r["ids"]].index_copy_(0, self.packed[r["where"]][:f].long(), src.int())
        self.graphs[key].replay()
        return self.logits[: len(qlens)]

    def close(self) -> None:
        """Graphs go before the process group and the pool (the order the NCCL pitfalls call for)."""
        self.graphs.clear()

"""The paged KV cache's bookkeeping: free blocks, per-sequence block tables, ref counts and the prefix cache.

Replicated on every tensor-parallel rank, so it must be deterministic: the same calls give the same block ids
on every rank. It iterates only lists, deques and an insertion-ordered dict of block ids, and never uses
randomness, time, or the (per-process salted) hash of str/bytes for anything but dict look-ups.

Prefix caching keys each full block by ``block_hash(parent_key, token_ids)``, a sha256 chained from the
previous block's key. A hash collision never serves wrong KV: a look-up accepts a block only if its stored
token ids equal the prompt's and its stored parent is the very block registration matched one level up (a
registration id that is never reused, rather than the parent's key, which a different block may take after an
eviction). A collision therefore degrades to a miss, and a sequence whose chain hits one stops registering
further blocks (their parent could not be matched).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

ROOT_KEY = b""  # the parent key of a sequence's first block
ROOT_REG = 0  # the parent registration id of a sequence's first block; real ones start at 1


def block_hash(parent_key: bytes, token_ids: Sequence[int]) -> bytes:
    """Key of a full block: sha256 over the parent block's key and this block's token ids (int64 LE)."""
    return hashlib.sha256(parent_key + struct.pack(f"<{len(token_ids)}q", *token_ids)).digest()


@dataclass(slots=True)
class _Block:
    ref: int = 0
    key: bytes | None = None  # set while registered in the prefix cache
    token_ids: tuple[int, ...] = ()  # the tokens whose KV it holds, checked on every hit
    parent_reg: int = ROOT_REG  # registration id of the block before it in the chain it was cached from
    reg: int = ROOT_REG  # this registration's id, unique for the manager's lifetime


@dataclass(slots=True)
class _Seq:
    table: list[int] = field(default_factory=list)
    num_hashed: int = 0  # leading full blocks already keyed (matched at admit or seen by cache_blocks)
    key: bytes = ROOT_KEY  # key of block num_hashed - 1
    reg: int | None = ROOT_REG  # registration equivalent to block num_hashed - 1; None: chain hit a collision
    row: int = -1  # its row of ``BlockManager.rows`` (-1: the manager keeps no rows)


class TableOverflow(ValueError):
    """A sequence needs more blocks than its row of the block-table array holds (its request fails alone)."""


class BlockManager:
    """Hands out KV blocks 1..num_blocks-1 (block 0 is the write target of padding rows) to sequences.

    A block is in exactly one place: the free list (unregistered, ref 0), the evictable LRU (registered in
    the prefix cache, ref 0, oldest first) or referenced by the tables of live sequences (ref > 0)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 max_seqs: int | None = None, max_blocks_per_seq: int | None = None) -> None:
        """With ``max_seqs`` and ``max_blocks_per_seq``, every live sequence also owns a row of ``rows``, an
        int32 [max_seqs, max_blocks_per_seq] array kept equal to its table as the table changes (a new block
        is one write): a step's block tables are then one gather of rows, never rebuilt from lists."""
        if num_blocks < 2 or block_size < 1:
            raise ValueError(f"need num_blocks >= 2 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block() for _ in range(num_blocks)]
        self._free: deque[int] = deque(range(1, num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._by_key: dict[bytes, int] = {}
        self._seqs: dict[int, _Seq] = {}
        self._next_reg = ROOT_REG + 1
        self._lookup_tokens = 0
        self._hit_tokens = 0
        self.cache_version = 0  # changes when a key is registered or evicted: a lookup may then differ
        self.rows: np.ndarray | None = None
        self._free_rows: list[int] = []
        if max_seqs is not None:
            self.rows = np.zeros((max_seqs, max_blocks_per_seq or 1), dtype=np.int32)
            self._free_rows = list(range(max_seqs - 1, -1, -1))  # pop() hands out row 0 first

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation could take: free plus cached-but-unreferenced (evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks referenced by live sequences."""
        return (self.num_blocks - 1 - self.num_free_blocks) / (self.num_blocks - 1)

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prompt tokens served from the cache / prompt tokens looked up, over all admits."""
        return self._hit_tokens / self._lookup_tokens if self._lookup_tokens else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match(self, token_ids: Sequence[int]) -> list[int]:
        """The longest cached chain of full blocks matching token_ids, leaving at least one token to compute
        (its logits are needed). No side effect: nothing is referenced, counted or moved in the LRU, so a
        scheduler may look up a request that does not fit yet, and keep the answer while ``cache_version``
        stays the same."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        found: list[int] = []
        key, reg = ROOT_KEY, ROOT_REG
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            key = block_hash(key, tokens)
            b = self._by_key.get(key)
            if b is None or self._blocks[b].token_ids != tokens or self._blocks[b].parent_reg != reg:
                break
            found.append(b)
            reg = self._blocks[b].reg
        return found

    def free_after_match(self, matched: list[int]) -> int:
        """The blocks a sequence admitted with ``matched`` could still grow into."""
        return self.num_free_blocks - sum(1 for b in matched if self._blocks[b].ref == 0)

    def admit(self, seq_id: int, token_ids: Sequence[int], matched: list[int] | None = None) -> int:
        """Creates seq_id's table from the cached chain ``matched`` (``match(token_ids)`` when None, or when
        the cache changed since) and counts the lookup for the hit rate, once per admission; returns the
        number of cached tokens."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} already has a block table")
        found = self.match(token_ids) if matched is None else matched
        if self.rows is not None and len(found) > self.rows.shape[1]:
            raise TableOverflow(f"sequence {seq_id} needs {len(found)} blocks, more than the "
                                f"{self.rows.shape[1]} of a block-table row")
        seq = self._seqs[seq_id] = _Seq()
        if self.rows is not None:
            if not self._free_rows:
                del self._seqs[seq_id]
                raise ValueError(f"no block-table row left for sequence {seq_id}: {len(self.rows)} in use")
            seq.row = self._free_rows.pop()
        if not self.enable_prefix_caching:
            return 0
        for b in found:
            block = self._blocks[b]
            if block.ref == 0:
                del self._evictable[b]
            block.ref += 1
            seq.table.append(b)
        if self.rows is not None and found:
            self.rows[seq.row, : len(found)] = found
        if found:
            last = self._blocks[found[-1]]
            seq.num_hashed, seq.key, seq.reg = len(found), last.key, last.reg
        self._lookup_tokens += len(token_ids)
        self._hit_tokens += len(found) * self.block_size
        return len(found) * self.block_size

    def can_grow(self, seq_id: int, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(self._seqs[seq_id].table) <= self.num_free_blocks

    def grow(self, seq_id: int, num_tokens: int) -> bool:
        """Extends the table to cover num_tokens token slots, all or nothing: free blocks first, then the
        least recently used evictable ones. False, and no change, if there are not enough."""
        seq = self._seqs[seq_id]
        table = seq.table
        have = len(table)
        need = self.blocks_needed(num_tokens) - have
        if need <= 0:
            return True  # the common case: a decode within its last block
        if self.rows is not None and have + need > self.rows.shape[1]:
            raise TableOverflow(f"sequence {seq_id} needs {have + need} blocks for {num_tokens} tokens, more "
                                f"than the {self.rows.shape[1]} of a block-table row")
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            table.append(self._take())
        if self.rows is not None:
            self.rows[seq.row, have : have + need] = table[have:]
        return True

    def _take(self) -> int:
        if self._free:
            b = self._free.popleft()
        else:
            b, _ = self._evictable.popitem(last=False)
            block = self._blocks[b]
            del self._by_key[block.key]
            self.cache_version += 1
            block.key, block.token_ids, block.parent_reg, block.reg = None, (), ROOT_REG, ROOT_REG
        self._blocks[b].ref = 1
        return b

    def cache_blocks(self, seq_id: int, token_ids: Sequence[int], num_tokens: int) -> None:
        """Registers every full block among the first num_tokens of token_ids (their KV written or launched)
        not keyed yet. A block whose key another block holds stays unregistered; idempotent."""
        seq = self._seqs[seq_id]
        bs = self.block_size
        if num_tokens > len(token_ids) or num_tokens > len(seq.table) * bs:
            raise ValueError(f"{num_tokens} tokens exceed sequence {seq_id}'s tokens or block table")
        if not self.enable_prefix_caching:
            return
        for i in range(seq.num_hashed, num_tokens // bs):
            if seq.reg is None:  # the chain hit a collision: no later block of it could be matched
                return
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            key = block_hash(seq.key, tokens)
            holder = self._by_key.get(key)
            if holder is None:
                block = self._blocks[seq.table[i]]
                block.key, block.token_ids, block.parent_reg, block.reg = key, tokens, seq.reg, self._next_reg
                self._by_key[key] = seq.table[i]
                self._next_reg += 1
                self.cache_version += 1
                reg: int | None = block.reg
            elif self._blocks[holder].token_ids == tokens and self._blocks[holder].parent_reg == seq.reg:
                reg = self._blocks[holder].reg  # same content cached by another sequence: chain through it
            else:
                reg = None  # hash collision
            seq.num_hashed, seq.key, seq.reg = i + 1, key, reg

    def free(self, seq_id: int) -> None:
        """Drops seq_id's references, last block first so that a chain's tail is evicted before its head.
        Unknown seq_id: no-op (an abort may race a finish)."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        if self.rows is not None:
            self.rows[seq.row, : len(seq.table)] = 0
            self._free_rows.append(seq.row)
        for b in reversed(seq.table):
            block = self._blocks[b]
            block.ref -= 1
            if block.ref == 0:
                if block.key is None:
                    self._free.append(b)
                else:
                    self._evictable[b] = None

    def block_table(self, seq_id: int) -> list[int]:
        """A copy of seq_id's block table."""
        return list(self._seqs[seq_id].table)

    def table_view(self, seq_id: int) -> list[int]:
        """seq_id's block table itself, for the readers of every step (no copy): never modify it."""
        return self._seqs[seq_id].table

    def row(self, seq_id: int) -> int:
        """seq_id's row of ``rows`` (the manager must keep rows)."""
        return self._seqs[seq_id].row

    def slot(self, seq_id: int, position: int) -> int:
        """Index of token `position`'s KV in the flattened [num_blocks * block_size] pool."""
        return self._seqs[seq_id].table[position // self.block_size] * self.block_size + position % self.block_size

"""BlockManager: each allocation and prefix-caching rule, then random workloads checked after every operation
against invariants and against an oracle of what KV every block really holds."""

from __future__ import annotations

import hashlib
import os
import random
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tpserve.executor import block_manager
from tpserve.executor.block_manager import BlockManager


def filled(bm: BlockManager, seq_id: int, tokens: Sequence[int]) -> int:
    """Admits seq_id, computes all its tokens and caches them, as a step of the engine would; returns hits."""
    cached = bm.admit(seq_id, tokens)
    assert bm.grow(seq_id, len(tokens))
    bm.cache_blocks(seq_id, tokens, len(tokens))
    return cached


def test_block_zero_never_handed_out_and_pool_accounting() -> None:
    bm = BlockManager(num_blocks=5, block_size=4)
    assert (bm.num_free_blocks, bm.usage) == (4, 0.0)
    bm.admit(1, [])
    assert bm.grow(1, 16)
    assert bm.block_table(1) == [1, 2, 3, 4]
    assert (bm.num_free_blocks, bm.usage) == (0, 1.0)
    assert not bm.grow(1, 17)
    bm.free(1)
    assert (bm.num_free_blocks, bm.usage) == (4, 0.0)


def test_blocks_needed_and_slots() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    assert [bm.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    bm.admit(1, [])
    bm.admit(2, [])
    bm.grow(1, 4)
    bm.grow(2, 6)
    assert bm.block_table(2) == [2, 3]
    assert [bm.slot(2, p) for p in range(6)] == [8, 9, 10, 11, 12, 13]
    with pytest.raises(IndexError):
        bm.slot(2, 8)


def test_grow_is_all_or_nothing() -> None:
    bm = BlockManager(num_blocks=5, block_size=4)
    bm.admit(1, [])
    bm.admit(2, [])
    assert bm.grow(1, 12)
    assert not bm.can_grow(2, 8)
    assert not bm.grow(2, 8)
    assert (bm.block_table(2), bm.num_free_blocks) == ([], 1)
    assert bm.can_grow(2, 4) and bm.grow(2, 4)
    assert bm.grow(1, 5) and bm.block_table(1) == [1, 2, 3]  # already covered: no change


def test_admit_takes_the_longest_cached_chain_but_leaves_a_token_to_compute() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(10))
    assert filled(bm, 1, prompt) == 0
    first = bm.block_table(1)
    bm.free(1)
    assert bm.admit(2, prompt) == 8 and bm.block_table(2) == first[:2]
    assert bm.admit(3, prompt[:8]) == 4 and bm.block_table(3) == first[:1]  # 8 tokens: one must be computed
    assert bm.admit(4, prompt[:4] + [99] * 6) == 4
    assert bm.admit(5, [99] + prompt[1:]) == 0 and bm.block_table(5) == []
    assert bm.admit(6, prompt[:1]) == 0
    with pytest.raises(ValueError):
        bm.admit(6, prompt)


def test_hit_on_an_unreferenced_cached_block_takes_it_out_of_the_evictable_set() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    filled(bm, 1, [1, 2, 3, 4, 5])
    bm.free(1)
    assert (bm.num_free_blocks, bm.usage) == (3, 0.0)  # two cached blocks are still allocatable
    assert bm.admit(2, [1, 2, 3, 4, 5]) == 4
    assert (bm.num_free_blocks, bm.usage) == (1, 2 / 3)
    bm.admit(3, [])
    assert bm.grow(3, 2) and not bm.grow(3, 4)  # the hit blocks cannot be evicted from under seq 2
    assert bm.block_table(2) == [1, 2]


def test_eviction_is_lru_tail_first_and_an_evicted_block_loses_its_key() -> None:
    bm = BlockManager(num_blocks=7, block_size=2)
    filled(bm, 1, [1, 1, 2, 2, 3])  # blocks 1, 2 cached, 3 partial
    filled(bm, 2, [5, 5, 6, 6, 7])  # blocks 4, 5 cached, 6 partial
    bm.free(1)
    bm.free(2)  # LRU, oldest first: 2, 1, 5, 4
    assert bm.admit(3, [1, 1, 2, 2, 3]) == 4  # chain 1-2 used again: now the newest
    bm.free(3)  # LRU: 5, 4, 2, 1
    bm.admit(4, [])
    assert bm.grow(4, 6)
    assert bm.block_table(4) == [3, 6, 5]  # the free list first, then the oldest cached block, a chain's tail
    assert bm.admit(5, [5, 5, 6, 6, 7]) == 2  # block 5 was reused: it lost its key
    assert bm.admit(6, [1, 1, 2, 2, 3]) == 4


def test_free_is_a_no_op_for_an_unknown_sequence() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    filled(bm, 1, [1, 2, 3])
    bm.free(2)
    bm.free(1)
    bm.free(1)
    assert (bm.num_free_blocks, bm.usage) == (3, 0.0)


def test_cache_blocks_registers_only_full_blocks_and_is_idempotent() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(11))
    bm.admit(1, tokens)
    bm.grow(1, 11)
    bm.cache_blocks(1, tokens, 7)  # one full block
    bm.cache_blocks(1, tokens, 7)
    bm.admit(2, tokens)
    assert bm.block_table(2) == bm.block_table(1)[:1]
    bm.cache_blocks(1, tokens, 11)  # the second block fills; the third stays partial
    bm.cache_blocks(1, tokens, 11)
    assert bm.admit(3, tokens + [11, 12]) == 8
    with pytest.raises(ValueError):
        bm.cache_blocks(1, tokens + [11, 12], 13)  # beyond the block table


def test_a_key_cached_by_another_block_leaves_the_block_unregistered_and_the_chain_goes_on() -> None:
    bm = BlockManager(num_blocks=16, block_size=2)
    bm.admit(1, [1, 1, 2, 2, 3])
    bm.admit(2, [1, 1, 4, 4, 5])  # admitted before seq 1 cached: no hit, computes a duplicate first block
    for seq_id, tokens in ((1, [1, 1, 2, 2, 3]), (2, [1, 1, 4, 4, 5])):
        bm.grow(seq_id, 5)
        bm.cache_blocks(seq_id, tokens, 5)
    one, two = bm.block_table(1), bm.block_table(2)
    bm.free(2)
    bm.free(1)
    assert bm.num_free_blocks == 15
    assert list(bm._evictable) == [two[1], one[1], one[0]]  # seq 2's duplicate went back to the free list
    assert bm.admit(3, [1, 1, 4, 4, 5]) == 4 and bm.block_table(3) == [one[0], two[1]]


def test_preempted_sequence_resumes_on_its_own_cached_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(9))
    filled(bm, 1, tokens)
    tokens += [100, 101, 102]  # generated
    bm.grow(1, len(tokens))
    bm.cache_blocks(1, tokens, len(tokens) - 1)  # the last sampled token has no KV yet
    table = bm.block_table(1)
    bm.free(1)
    assert bm.admit(1, tokens) == 8 and bm.block_table(1) == table[:2]


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    filled(bm, 1, [1, 2, 3, 4, 5])
    bm.free(1)
    assert bm.admit(2, [1, 2, 3, 4, 5]) == 0
    assert (bm.prefix_cache_hit_rate, bm.num_free_blocks, len(bm._evictable)) == (0.0, 3, 0)


def test_prefix_cache_hit_rate_counts_prompt_tokens_over_all_admits() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    assert bm.prefix_cache_hit_rate == 0.0
    filled(bm, 1, list(range(10)))
    bm.admit(2, list(range(10)))
    assert bm.prefix_cache_hit_rate == 8 / 20


def test_a_constant_hash_degrades_to_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_manager, "block_hash", lambda parent, tokens: b"same")
    bm = BlockManager(num_blocks=16, block_size=2)
    filled(bm, 1, [1, 1, 2, 2, 3])
    bm.free(1)
    assert bm.admit(2, [7, 7, 2, 2, 3]) == 0  # same key, other tokens
    assert bm.admit(3, [1, 1, 1, 1, 3]) == 2  # second block: same key and tokens, another parent


def _first_token_blind(parent: bytes, tokens: Sequence[int]) -> bytes:
    """A chained key that ignores a block's first token: blocks [1, 1] and [7, 1] collide."""
    return hashlib.sha256(parent + struct.pack(f"<{len(tokens) - 1}q", *tokens[1:])).digest()


def test_a_sequence_whose_chain_collided_caches_no_further_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_manager, "block_hash", _first_token_blind)
    bm = BlockManager(num_blocks=16, block_size=2)
    filled(bm, 1, [1, 1, 2, 2, 9])
    filled(bm, 2, [7, 1, 5, 5, 9])  # [7, 1] collides with [1, 1]: its [5, 5] block follows another prefix
    assert bm.admit(3, [1, 1, 5, 5, 9]) == 2


def test_a_collision_after_the_parent_was_evicted_is_a_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child block cached under [1, 1] must not be served after [7, 1] took the key of its evicted parent
    (a check of the parent's key would serve it)."""
    monkeypatch.setattr(block_manager, "block_hash", _first_token_blind)
    bm = BlockManager(num_blocks=7, block_size=2)
    bm.admit(0, [1, 1, 5, 5, 9])
    bm.admit(1, [1, 1, 2, 2, 9])  # before seq 0 cached: a duplicate [1, 1] block, then its own [2, 2]
    for seq_id, tokens in ((0, [1, 1, 5, 5, 9]), (1, [1, 1, 2, 2, 9])):
        bm.grow(seq_id, 5)
        bm.cache_blocks(seq_id, tokens, 5)
    bm.free(0)
    bm.admit(2, [])
    assert bm.grow(2, 6)  # evicts seq 0's cached blocks, the [1, 1] parent among them
    bm.free(2)
    bm.free(1)
    filled(bm, 3, [7, 1, 8, 8, 9])  # [7, 1] takes the parent's key
    bm.free(3)
    assert bm.admit(4, [7, 1, 2, 2, 9]) == 2


# Random workloads -------------------------------------------------------------------------------------------


@dataclass
class _Req:
    seq_id: int
    tokens: list[int]
    max_len: int
    computed: int = 0
    hit_blocks: int = 0


@dataclass
class Workload:
    """An engine's calls in random order, with pool pressure: admit (shared prefixes), step (chunked
    prefill or decode: grow, write KV, cache_blocks), finish, abort, preempt and resume. ``content`` is the
    oracle: for each block, the tokens whose KV was written into it, the whole prefix included."""

    seed: int
    num_blocks: int = 24
    block_size: int = 4
    prefix_caching: bool = True
    bm: BlockManager = field(init=False)
    rng: random.Random = field(init=False)
    running: dict[int, _Req] = field(default_factory=dict)
    preempted: list[_Req] = field(default_factory=list)
    content: dict[int, tuple[int, ...]] = field(default_factory=dict)
    trace: list[tuple[object, ...]] = field(default_factory=list)
    next_id: int = 0

    def __post_init__(self) -> None:
        # rows for the running sequences (8 admitted, more resumed), each as wide as the longest request (40 tokens)
        self.bm = BlockManager(self.num_blocks, self.block_size, self.prefix_caching, max_seqs=64,
                               max_blocks_per_seq=-(-40 // self.block_size))
        self.rng = random.Random(self.seed)
        self.prefixes = [[self.rng.randrange(4) for _ in range(self.rng.randint(3, 20))] for _ in range(4)]

    def run(self, num_ops: int, check: Callable[[Workload], None]) -> None:
        ops = [self.admit, self.resume, self.step, self.step, self.step, self.step, self.abort, self.preempt]
        for _ in range(num_ops):
            self.rng.choice(ops)()
            check(self)
        for seq_id in list(self.running):
            self.bm.free(seq_id)
            del self.running[seq_id]
            check(self)

    def admit(self) -> None:
        if len(self.running) >= 8:
            return
        prefix = self.rng.choice(self.prefixes)
        tokens = prefix[: self.rng.randint(0, len(prefix))] + [self.rng.randrange(4) for _ in range(8)]
        req = _Req(self.next_id, tokens[: self.rng.randint(1, len(tokens))], max_len=self.rng.randint(4, 40))
        self.next_id += 1
        self._admit(req)

    def resume(self) -> None:
        if self.preempted:
            self._admit(self.preempted.pop(0))

    def _admit(self, req: _Req) -> None:
        cached = self.bm.admit(req.seq_id, req.tokens)
        table = self.bm.block_table(req.seq_id)
        self.trace.append(("admit", req.seq_id, cached, tuple(table)))
        bs = self.block_size
        assert cached == len(table) * bs and cached <= (len(req.tokens) - 1) // bs * bs
        for i, b in enumerate(table):
            assert self.content[b] == tuple(req.tokens[: (i + 1) * bs]), "a hit served another prefix's KV"
        req.computed, req.hit_blocks = cached, len(table)
        self.running[req.seq_id] = req

    def step(self) -> None:
        if not self.running:
            return
        req = self.running[self.rng.choice(sorted(self.running))]
        target = min(len(req.tokens), req.computed + self.rng.randint(1, 9))
        can = self.bm.can_grow(req.seq_id, target)
        before = self.bm.block_table(req.seq_id)
        grew = self.bm.grow(req.seq_id, target)
        self.trace.append(("grow", req.seq_id, target, grew, tuple(self.bm.block_table(req.seq_id))))
        assert grew == can
        if not grew:
            assert self.bm.block_table(req.seq_id) == before
            if self.rng.random() < 0.7:
                self.preempt(req)
            return
        table = self.bm.block_table(req.seq_id)
        bs = self.block_size
        for i in range(req.computed // bs, self.bm.blocks_needed(target)):
            assert i >= req.hit_blocks and self.bm._blocks[table[i]].ref == 1, "a write into a shared block"
            self.content[table[i]] = tuple(req.tokens[: min((i + 1) * bs, target)])
        req.computed = target
        if self.rng.random() < 0.9:  # else cache_blocks comes with a later step
            self.bm.cache_blocks(req.seq_id, req.tokens, target)
        if req.computed == len(req.tokens):
            if len(req.tokens) >= req.max_len:
                self.bm.free(req.seq_id)
                del self.running[req.seq_id]
                self.trace.append(("finish", req.seq_id))
            else:
                req.tokens.append(self.rng.randrange(4))

    def abort(self) -> None:
        seq_id = self.rng.randrange(self.next_id + 2)  # sometimes unknown or already gone
        self.bm.free(seq_id)
        self.running.pop(seq_id, None)
        self.trace.append(("abort", seq_id))

    def preempt(self, req: _Req | None = None) -> None:
        if req is None:
            if not self.running:
                return
            req = self.running[max(self.running)]  # the most recently admitted
        self.bm.free(req.seq_id)
        del self.running[req.seq_id]
        self.preempted.append(req)
        self.trace.append(("preempt", req.seq_id))


def check_invariants(w: Workload) -> None:
    bm = w.bm
    tables = {seq_id: bm.block_table(seq_id) for seq_id in w.running}
    assert sorted(bm._seqs) == sorted(w.running)
    refs = Counter(b for table in tables.values() for b in table)
    assert all(len(set(table)) == len(table) for table in tables.values())
    free, evictable = list(bm._free), list(bm._evictable)
    assert sorted(free + evictable + list(refs)) == list(range(1, bm.num_blocks)), "a block in two places"
    assert [block.ref for block in bm._blocks] == [refs[b] for b in range(bm.num_blocks)]
    assert all(bm._blocks[b].key is None for b in free) and all(bm._blocks[b].key is not None for b in evictable)
    registered = [b for b, block in enumerate(bm._blocks) if block.key is not None]
    assert len(bm._by_key) == len(registered) and all(bm._by_key[bm._blocks[b].key] == b for b in registered)
    for b in registered:  # a registered block holds exactly the tokens it is keyed by
        assert w.content[b][-bm.block_size :] == bm._blocks[b].token_ids
    assert bm.num_free_blocks + len(refs) == bm.num_blocks - 1
    # the block-table array equals a rebuild from the tables: each live sequence's own row, zeros elsewhere
    assert bm.rows is not None
    rebuilt = np.zeros_like(bm.rows)
    for seq_id, table in tables.items():
        rebuilt[bm.row(seq_id), : len(table)] = table
    assert np.array_equal(bm.rows, rebuilt)
    assert len({bm.row(seq_id) for seq_id in tables}) == len(tables)
    assert bm.usage == pytest.approx(len(refs) / (bm.num_blocks - 1))


def _weak_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Four possible keys: collisions on almost every look-up, with parents evicted and keys re-taken."""
    return bytes([hashlib.sha256(parent + struct.pack(f"<{len(tokens)}q", *tokens)).digest()[0] % 4])


HASHES: dict[str, Callable[[bytes, Sequence[int]], bytes] | None] = {
    "sha256": None,
    "constant": lambda parent, tokens: b"same",
    "weak": _weak_hash,
}


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("hash_name", sorted(HASHES))
def test_random_workload_keeps_every_invariant(seed: int, hash_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if HASHES[hash_name] is not None:
        monkeypatch.setattr(block_manager, "block_hash", HASHES[hash_name])
    w = Workload(seed)
    w.run(3000, check_invariants)
    kinds = Counter(op[0] for op in w.trace)
    assert kinds["preempt"] > 50 and kinds["finish"] > 30
    assert sum(1 for op in w.trace if op[0] == "grow" and not op[3]) > 50, "no pool pressure"
    if hash_name == "sha256":
        assert w.bm.prefix_cache_hit_rate > 0.1
    assert (w.bm.usage, w.bm.num_free_blocks) == (0.0, w.num_blocks - 1)


def test_random_workload_without_prefix_caching() -> None:
    w = Workload(4, prefix_caching=False)
    w.run(3000, check_invariants)
    assert all(op[2] == 0 for op in w.trace if op[0] == "admit")
    assert (w.bm.usage, w.bm.num_free_blocks, w.bm.prefix_cache_hit_rate) == (0.0, w.num_blocks - 1, 0.0)


def trace_digest(seed: int) -> str:
    w = Workload(seed)
    w.run(2000, lambda w: None)
    return hashlib.sha256(repr(w.trace).encode()).hexdigest()


def test_same_calls_give_the_same_blocks_in_every_process() -> None:
    """Ranks are separate processes with different str/bytes hash salts; their tables must still agree."""
    here = trace_digest(5)
    assert trace_digest(5) == here
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_block_manager as t; "
    code += "print(t.trace_digest(5))"
    for hash_seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert out.stdout.strip() == here


def test_a_table_longer_than_its_row_is_refused_without_a_change() -> None:
    bm = BlockManager(20, 4, max_seqs=2, max_blocks_per_seq=2)
    bm.admit(1, [1, 2, 3])
    assert bm.grow(1, 8)
    free = bm.num_free_blocks
    with pytest.raises(block_manager.TableOverflow, match="sequence 1 needs 3 blocks"):
        bm.grow(1, 9)
    assert bm.block_table(1) == bm.rows[bm.row(1)].tolist() and bm.num_free_blocks == free

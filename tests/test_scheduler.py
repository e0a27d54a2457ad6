"""The scheduler serves latency: decodes first, and no request's prompt chunk longer than max_chunk_tokens, so
a long prompt cannot hold the whole step while short prompts wait behind it."""

from __future__ import annotations

import pytest

from tpserve.executor.block_manager import BlockManager
from tpserve.executor.request import Request
from tpserve.executor.scheduler import Scheduler
from tpserve.sampling_params import SamplingParams


def request(rid: int, prompt_len: int) -> Request:
    return Request(rid, [5 + rid] * prompt_len, SamplingParams(max_tokens=4), False)


def steps_until_first_computed(max_chunk_tokens: int | None) -> tuple[int, list[list[tuple[int, int]]]]:
    """A 4,000-token prompt, then a 10-token one right behind it: steps until the short one's prompt is done."""
    scheduler = Scheduler(BlockManager(600, 16), max_batch_size=8, max_num_tokens=1024,
                          max_chunk_tokens=max_chunk_tokens)
    long, short = request(1, 4000), request(2, 10)
    scheduler.add(long)
    scheduler.add(short)
    steps = []
    for n in range(1, 20):
        batch = scheduler.schedule()
        steps.append([(s.request.request_id, s.num_tokens) for s in batch.seqs])
        if short.num_computed == 10:
            return n, steps
    return 0, steps


def test_a_long_prompt_leaves_room_for_the_short_one_behind_it():
    n, steps = steps_until_first_computed(max_chunk_tokens=256)
    assert n == 1, steps
    assert steps[0] == [(1, 256), (2, 10)]
    uncapped, steps = steps_until_first_computed(max_chunk_tokens=None)  # the whole budget goes to the long one
    assert uncapped == 4, steps


def test_decodes_come_first_and_chunks_stay_capped():
    scheduler = Scheduler(BlockManager(200, 16), max_batch_size=8, max_num_tokens=64, max_chunk_tokens=24)
    running = request(1, 5)
    scheduler.add(running)
    assert [(s.request.request_id, s.num_tokens) for s in scheduler.schedule().seqs] == [(1, 5)]
    running.output_token_ids.append(9)  # its first token is known: a decode now
    scheduler.add(request(2, 100))
    scheduler.add(request(3, 100))
    batch = scheduler.schedule()
    assert [(s.request.request_id, s.num_tokens) for s in batch.seqs] == [(1, 1), (2, 24), (3, 24)]


def test_a_step_budget_below_the_batch_is_refused():
    with pytest.raises(ValueError, match="max_num_tokens=4 is below max_batch_size=8"):
        Scheduler(BlockManager(10, 4), max_batch_size=8, max_num_tokens=4)


def test_prompt_scoring_requests_share_a_bounded_number_of_positions_per_step():
    """prompt_logprobs brings a row of logits per scored position: such chunks share SCORED_TOKENS_PER_STEP a
    step, take nothing from the prefix cache, and plain requests beside them are not held back."""
    from tpserve.executor.scheduler import SCORED_TOKENS_PER_STEP

    blocks = BlockManager(400, 16)
    scheduler = Scheduler(blocks, max_batch_size=8, max_num_tokens=2048)
    warm = request(9, 700)  # puts its prompt's blocks in the prefix cache
    scheduler.add(warm)
    scheduler.schedule()
    scheduler.remove(warm)
    scored = [Request(i, [14] * 700, SamplingParams(max_tokens=4, prompt_logprobs=1), False) for i in (1, 2)]
    plain = request(3, 300)
    for r in (*scored, plain):
        scheduler.add(r)
    seen = []
    while any(r.num_computed < 700 for r in scored):
        batch = scheduler.schedule()
        assert batch.seqs, "a step with nothing in it"
        seen.append([(s.request.request_id, s.num_tokens) for s in batch.seqs])
        assert sum(s.num_tokens for s in batch.seqs if s.request.scores_prompt) <= SCORED_TOKENS_PER_STEP, seen
    assert seen[0] == [(1, 512), (3, 300)]  # the plain one is not held back; the second scored one waits
    assert all(r.num_cached_tokens == 0 for r in scored)
    assert plain.num_computed == 300


def test_a_head_that_does_not_fit_is_looked_up_once_and_counted_once(monkeypatch):
    """Under memory pressure the waiting head is looked up once, not re-admitted, re-hashed and counted as a
    prefix-cache hit every step, and its cached blocks keep their place in the LRU until it is admitted."""
    from tpserve.executor import block_manager

    blocks = BlockManager(9, 4)  # 8 usable blocks
    scheduler = Scheduler(blocks, max_batch_size=4, max_num_tokens=64)
    prefix = list(range(100, 116))
    first = Request(1, prefix, SamplingParams(max_tokens=4), False)
    scheduler.add(first)
    scheduler.schedule()
    scheduler.remove(first)  # its 4 blocks stay cached, evictable
    hog = Request(2, list(range(200, 216)), SamplingParams(max_tokens=4), False)
    scheduler.add(hog)
    scheduler.schedule()  # takes the 4 free blocks
    head = Request(3, prefix + [7] * 8, SamplingParams(max_tokens=4), False)  # 4 cached blocks + 2 new: no room
    scheduler.add(head)
    lru = list(blocks._evictable)
    hashes = []
    real = block_manager.block_hash
    monkeypatch.setattr(block_manager, "block_hash", lambda *a: hashes.append(1) or real(*a))
    for _ in range(5):
        assert scheduler.schedule().seqs == []
        assert scheduler.waiting[0] is head and head not in scheduler.running
    assert len(hashes) <= 5, f"{len(hashes)} block hashes for one head over 5 steps"
    assert list(blocks._evictable) == lru
    assert blocks.prefix_cache_hit_rate == 0.0  # nothing admitted yet with a hit
    scheduler.remove(hog)  # something changes: room for the head
    batch = scheduler.schedule()
    assert [(s.request.request_id, s.start_pos, s.num_tokens) for s in batch.seqs] == [(3, 16, 8)]
    assert head.num_cached_tokens == 16
    assert blocks.prefix_cache_hit_rate == 16 / (16 + 16 + 24)  # every admission counted once


def simulate(steady: bool, seed: int) -> tuple[list, int]:
    """A random workload (arrivals, overlap-style pending tokens, finishes, a pool small enough to preempt);
    every step's schedule and the block tables after it."""
    import random

    rng = random.Random(seed)
    blocks = BlockManager(48, 4)
    scheduler = Scheduler(blocks, max_batch_size=6, max_num_tokens=32, max_chunk_tokens=12)
    if not steady:
        scheduler._steady_decode = lambda: None
    taken = 0
    history = []
    live: list[Request] = []
    pending: list[Request] = []  # sampled last step, known on the host only now (the overlap loop's lag)
    for step in range(300):
        if rng.random() < 0.08:
            req = Request(step, [rng.randrange(50) for _ in range(rng.randrange(1, 20))],
                          SamplingParams(max_tokens=rng.randrange(1, 40)), False)
            live.append(req)
            scheduler.add(req)
        for req in pending:
            req.num_pending -= 1
            req.output_token_ids.append(rng.randrange(50))
        batch = scheduler.schedule()
        if steady and batch.seqs and scheduler.running and all(s.num_tokens == 1 for s in batch.seqs):
            taken += 1
        history.append([(s.request.request_id, s.start_pos, s.num_tokens, s.samples) for s in batch.seqs])
        pending = [s.request for s in batch.seqs if s.samples]
        for req in pending:
            req.num_pending += 1
        for req in list(live):
            if len(req.output_token_ids) >= req.params.max_tokens and not req.num_pending:
                scheduler.remove(req)
                live.remove(req)
        history.append(sorted((r.request_id, tuple(blocks.table_view(r.request_id))) for r in scheduler.running))
    return history, taken


@pytest.mark.parametrize("seed", range(6))
def test_the_steady_decode_shortcut_schedules_exactly_what_the_full_schedule_would(seed):
    fast, taken = simulate(True, seed)
    full, _ = simulate(False, seed)
    assert fast == full
    assert taken > 20  # the workload does reach steady decode steps


def test_a_steady_decode_step_is_the_last_one_advanced():
    scheduler = Scheduler(BlockManager(64, 4), max_batch_size=4, max_num_tokens=16)
    reqs = [request(i, 3) for i in range(3)]
    for r in reqs:
        scheduler.add(r)
    scheduler.schedule()  # the prompts
    for r in reqs:
        r.output_token_ids.append(1)
    first = [(s.request.request_id, s.start_pos) for s in scheduler.schedule().seqs]
    for r in reqs:
        r.output_token_ids.append(1)
    calls = []
    full = scheduler._run
    scheduler._run = lambda *a: calls.append(a) or full(*a)
    second = [(s.request.request_id, s.start_pos) for s in scheduler.schedule().seqs]
    assert second == [(rid, pos + 1) for rid, pos in first]
    assert calls == []  # taken without the full schedule

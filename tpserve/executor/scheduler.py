"""Continuous batching over the paged KV cache: which requests run in the next step, how many tokens each
computes, and which request gives its blocks back when the pool runs dry. Replicated on every rank: the same
state and the same calls give the same batch everywhere."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tpserve.executor.block_manager import BlockManager, TableOverflow
from tpserve.executor.request import Request

# Prompt positions one step scores (prompt_logprobs), all its requests together: each brings a row of float32
# logits and of log-probabilities, 1.2 MB at a 150k vocabulary, which the start-up memory profile never saw.
SCORED_TOKENS_PER_STEP = 512


@dataclass(slots=True)
class ScheduledSeq:
    request: Request
    start_pos: int
    num_tokens: int
    samples: bool  # the step completes the request's known tokens, so its last logits are sampled


@dataclass
class ScheduledBatch:
    seqs: list[ScheduledSeq]  # decodes (one new token) first, then prefill chunks

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    """Every step: one token for each running decode first, then prefill chunks (running ones, then waiting
    ones, oldest first) while the ``max_num_tokens`` budget, ``max_batch_size`` and the free blocks allow;
    no request's chunk is longer than ``max_chunk_tokens``, so a long prompt leaves room in every step for
    the short ones that arrive behind it.

    When a running request needs a block and none is free, the most recently admitted running request not
    already in this step is preempted: its blocks are freed and it waits at the head of the queue, to be
    recomputed from its prompt and the tokens it has generated (whose KV the prefix cache may still hold)."""

    def __init__(self, blocks: BlockManager, max_batch_size: int, max_num_tokens: int,
                 max_chunk_tokens: int | None = None) -> None:
        if max_num_tokens < max_batch_size:
            raise ValueError(f"max_num_tokens={max_num_tokens} is below max_batch_size={max_batch_size}: a step "
                             "must hold one token of every running request")
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.max_chunk_tokens = max_chunk_tokens or max_num_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self._running: set[Request] = set()  # the same requests, for O(1) membership (identity hashing)
        self._in_step: set[Request] = set()  # the requests this step schedules
        self.num_preemptions = 0
        # Requests that can never be scheduled (a block table longer than its row): the executor ends each
        # with its reason after the schedule, on every rank alike; the rest of the step runs.
        self.failed: list[tuple[Request, str]] = []
        # The waiting head's last lookup that did not fit: (request, cache version, matched blocks). Kept
        # until the prefix cache changes, so a head that waits for room is not re-hashed every step.
        self._head_lookup: tuple[Request, int, list[int]] | None = None

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> ScheduledBatch:
        steady = self._steady_decode()
        if steady is not None:
            return steady
        self.budget = self.max_num_tokens
        self.scored_budget = SCORED_TOKENS_PER_STEP
        self.seqs: list[ScheduledSeq] = []
        self._in_step.clear()
        decodes, chunks = [], []
        for r in self.running:
            left = r.num_tokens - r.num_computed
            if left == 1:
                decodes.append(r)
            elif left > 1:
                chunks.append(r)
        for req in decodes:
            if self.budget > 0 and req in self._running and not self._done_soon(req):
                self._run(req, 1)
        for req in chunks:  # a request preempted above is no longer running: skipped
            want = min(req.num_tokens - req.num_computed, self._chunk_cap(req))
            if self.budget > 0 and want > 0 and req in self._running:
                self._run(req, want)
        held: list[Request] = []  # prompt scorers waiting for next step's scoring budget: others may pass
        while self.waiting and self.budget > 0 and len(self.running) < self.max_batch_size:
            req = self.waiting[0]
            if req.num_pending:  # preempted with a token still on the device: resume once it is known
                break
            if req.scores_prompt and self._chunk_cap(req) == 0:
                held.append(self.waiting.popleft())
                continue
            tokens = req.prompt_token_ids + req.output_token_ids
            # A request that scores its prompt computes every prompt position: no prefix-cache hits for it.
            matched = [] if req.scores_prompt else self._lookup(req, tokens)
            if self.blocks.free_after_match(matched) == 0:  # not one block to compute into: wait, unadmitted
                self._head_lookup = (req, self.blocks.cache_version, matched)
                break
            self._head_lookup = None
            try:
                cached = self.blocks.admit(req.request_id, tokens, matched)
                if req.num_cached_tokens is None:  # the first admission, not a resume after a preemption
                    req.num_cached_tokens = cached
                req.num_computed = cached
                n = self._fit(req, min(req.num_tokens - cached, self._chunk_cap(req)))
            except TableOverflow as e:
                self.waiting.popleft()
                self.blocks.free(req.request_id)
                self.failed.append((req, str(e)))
                continue
            if n == 0:  # cannot happen with a free block and budget left; never admit a request with nothing
                self.blocks.free(req.request_id)
                req.num_computed = 0
                break
            self.waiting.popleft()
            self.running.append(req)
            self._running.add(req)
            self._take(req, n)
        self.waiting.extendleft(reversed(held))  # back at the head, in their order
        batch = ScheduledBatch(self.seqs)
        for seq in batch.seqs:
            self._cache(seq.request)
        return batch

    def _steady_decode(self) -> ScheduledBatch | None:
        """The schedule of a steady decode step, in one pass over the running requests: every one of them
        brings exactly one token, none is about to end, each fits its table (or one more block), and no
        waiting request could be admitted. Exactly what the full schedule would give then (a test checks it);
        None: anything else, and the full schedule runs."""
        running = self.running
        if not running or len(running) > self.max_num_tokens or (
                self.waiting and len(running) < self.max_batch_size):
            return None
        grow, bs = self.blocks.grow, self.blocks.block_size
        try:  # num_tokens, _done_soon and grow's no-op case inlined: this loop is the steady state's schedule
            for req in running:
                n, pending, outputs = req.num_computed, req.num_pending, len(req.output_token_ids)
                if (len(req.prompt_token_ids) + outputs + pending - n != 1 or outputs + pending >= req.params.max_tokens
                        or (n % bs == 0 and not grow(req.request_id, n + 1))):
                    return None  # a table grown above is one the full schedule grows too: no harm
        except TableOverflow:
            return None  # the full schedule fails that request
        seqs = []
        for req in running:
            n = req.num_computed
            seqs.append(ScheduledSeq(req, n, 1, True))
            req.num_computed = n + 1
            if (n + 1) // bs > req.num_cached_blocks:  # a block filled: offer it to the prefix cache
                self._cache(req)
        return ScheduledBatch(seqs)

    def _chunk_cap(self, req: Request) -> int:
        """A request that scores its prompt brings the logits of every position of its chunk: such chunks share
        ``SCORED_TOKENS_PER_STEP`` per step (0 left: it waits for the next step)."""
        return max(min(self.max_chunk_tokens, self.scored_budget), 0) if req.scores_prompt else self.max_chunk_tokens

    def _lookup(self, req: Request, tokens: list[int]) -> list[int]:
        """The head's cached prefix: the kept lookup while the prefix cache has not changed, else a new one."""
        kept = self._head_lookup
        if kept is not None and kept[0] is req and kept[1] == self.blocks.cache_version:
            return kept[2]
        return self.blocks.match(tokens)

    @staticmethod
    def _done_soon(req: Request) -> bool:
        """Its last token is already on the way (overlap): computing more would be waste."""
        return len(req.output_token_ids) + req.num_pending >= req.params.max_tokens

    def _run(self, req: Request, want: int) -> None:
        """Schedules up to ``want`` tokens of a running request, preempting newer requests for blocks."""
        while True:
            try:
                n = self._fit(req, want)
            except TableOverflow as e:
                self._stop_running(req)
                self.failed.append((req, str(e)))
                return
            if n == want or (n > 0 and want > 1):  # a prefill chunk may shrink to what fits
                self._take(req, n)
                return
            victim = next((r for r in reversed(self.running) if r is not req and not self._scheduled(r)), None)
            if victim is None or self.running.index(victim) < self.running.index(req):
                self.preempt(req)  # req is the newest that could give blocks back
                return
            self.preempt(victim)

    def _fit(self, req: Request, want: int) -> int:
        """Grows req's block table for as many of ``want`` next tokens as the budget and the pool allow."""
        n = min(want, self.budget)
        if self.blocks.grow(req.request_id, req.num_computed + n):
            return n
        table = len(self.blocks.table_view(req.request_id))
        room = (table + self.blocks.num_free_blocks) * self.blocks.block_size - req.num_computed
        n = min(n, room)
        return n if n > 0 and self.blocks.grow(req.request_id, req.num_computed + n) else 0

    def _scheduled(self, req: Request) -> bool:
        return req in self._in_step

    def _take(self, req: Request, n: int) -> None:
        start = req.num_computed
        req.num_computed += n
        self.budget -= n
        if req.scores_prompt:
            self.scored_budget -= n
        self.seqs.append(ScheduledSeq(req, start, n, samples=req.num_computed == req.num_tokens))
        self._in_step.add(req)

    def _cache(self, req: Request) -> None:
        """Offers the request's newly filled blocks whose tokens are all known to the prefix cache."""
        if req.num_computed // self.blocks.block_size <= req.num_cached_blocks:
            return  # no block filled since the last offer (most steps)
        known = min(req.num_computed, len(req.prompt_token_ids) + len(req.output_token_ids))
        if known // self.blocks.block_size > req.num_cached_blocks:
            self.blocks.cache_blocks(req.request_id, req.prompt_token_ids + req.output_token_ids, known)
            req.num_cached_blocks = known // self.blocks.block_size

    def _stop_running(self, req: Request) -> None:
        """Takes a running request out of the list and the set, and frees its blocks."""
        self.running.remove(req)
        self._running.discard(req)
        self.blocks.free(req.request_id)

    def preempt(self, req: Request) -> None:
        """Frees a running request's blocks; it waits at the head of the queue to be recomputed."""
        self._stop_running(req)
        req.num_computed = 0
        req.num_cached_blocks = 0
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def remove(self, request: Request) -> None:
        """Frees the request's blocks, whether it was running or waiting."""
        if request in self._running:
            self._stop_running(request)
        elif request in self.waiting:
            self.waiting.remove(request)

"""Continuous batching: which requests run in the next step, and how many tokens each computes."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tpserve.executor.request import Request


@dataclass
class ScheduledSeq:
    request: Request
    start_pos: int
    num_tokens: int
    samples: bool  # the step completes the request's known tokens, so its last logits are sampled


@dataclass
class ScheduledBatch:
    seqs: list[ScheduledSeq]

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    """Every step: one decode token for each running request, then prompt (chunks) of waiting ones while
    the token budget and the KV slots allow. Each slot holds one sequence of up to ``max_seq_len``
    tokens, which admission checked, so a request that holds a slot can always run to its end."""

    def __init__(self, num_slots: int, max_num_tokens: int) -> None:
        self.num_slots = num_slots
        self.max_num_tokens = max_num_tokens
        self.free_slots: list[int] = list(range(num_slots - 1, -1, -1))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_tokens
        seqs: list[ScheduledSeq] = []
        for req in self.running:
            if budget == 0:
                break
            if req.in_prefill:  # a chunked prompt that did not fit last step
                n = min(len(req.prompt_token_ids) - req.num_computed, budget)
            elif len(req.output_token_ids) + req.num_pending >= req.params.max_tokens:
                continue  # its last token is already on the way (overlap): computing more is waste
            else:
                n = 1
            seqs.append(self._take(req, n))
            budget -= n
        while self.waiting and self.free_slots and budget > 0:
            req = self.waiting.popleft()
            req.slot = self.free_slots.pop()
            self.running.append(req)
            seqs.append(self._take(req, min(len(req.prompt_token_ids), budget)))
            budget -= seqs[-1].num_tokens
        return ScheduledBatch(seqs)

    @staticmethod
    def _take(req: Request, n: int) -> ScheduledSeq:
        start = req.num_computed
        req.num_computed += n
        return ScheduledSeq(req, start, n, samples=req.num_computed == req.num_tokens)

    def remove(self, request: Request) -> None:
        """Frees the request's slot, whether it was running or waiting."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if request.slot is not None:
            self.free_slots.append(request.slot)
            request.slot = None

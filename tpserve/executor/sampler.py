"""Token sampling that gives the same tokens on every rank: same logits, same seeded generators."""

from __future__ import annotations

import torch

from tpserve.executor.request import Request


class Sampler:
    def __init__(self, device: torch.device, engine_seed: int) -> None:
        self.device = device
        self.engine_seed = engine_seed

    def generator_for(self, request: Request) -> torch.Generator | None:
        """A per-request generator: an explicit seed reproduces across runs; otherwise derived from the
        engine seed and the request id, still identical on every rank."""
        if request.params.greedy:
            return None
        seed = request.params.seed
        if seed is None:
            seed = (self.engine_seed * 1_000_003 + request.request_id) % 2**63
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        return g

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """logits: float32 [S, V] for the requests in order; returns int64 [S] on the device."""
        tokens = torch.argmax(logits, dim=-1)
        for i, req in enumerate(requests):
            if req.params.greedy:
                continue
            tokens[i] = self._sample_row(logits[i], req)
        return tokens

    @staticmethod
    def _sample_row(row: torch.Tensor, req: Request) -> torch.Tensor:
        p = req.params
        row = row / p.temperature
        if p.top_k > 0 and p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            drop = cumulative - sorted_probs > p.top_p  # keep the smallest prefix reaching top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return torch.multinomial(probs, 1, generator=req.generator)[0]

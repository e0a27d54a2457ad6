"""Token sampling that gives the same tokens on every rank: same logits, same seeded generators.

Sampling never raises on a row's values: a random row draws ``argmax(probs / q)`` with exponential noise
``q`` (the exponential race, equivalent to sampling from ``probs``), where ``torch.multinomial`` raises on
NaN or inf probabilities (on CUDA a device-side assert that kills the process). One request's row can
therefore never stop the batch, whatever its logits.
"""

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
        rows = [i for i, req in enumerate(requests) if not req.params.greedy]
        if rows:
            sampled = [requests[i] for i in rows]
            pin = logits.device.type == "cuda"  # pinned: a copy from pageable memory waits for the device
            index = torch.tensor(rows, dtype=torch.long, pin_memory=pin).to(logits.device, non_blocking=pin)
            tokens.index_copy_(0, index, self._sample_rows(logits.index_select(0, index), sampled))
        return tokens

    def _sample_rows(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Temperature, top-k and top-p as batched operations with per-row parameters."""
        n, vocab = logits.shape
        params = [r.params for r in requests]
        pin = logits.device.type == "cuda"
        host = torch.tensor([[p.temperature, p.top_p, min(p.top_k, vocab) or vocab] for p in params],
                            dtype=torch.float32, pin_memory=pin)
        per_row = host.to(logits.device, non_blocking=pin)
        temperature, top_p, top_k = per_row[:, 0:1], per_row[:, 1:2], per_row[:, 2:3].long()
        scaled = logits.float() / temperature
        if any(0 < p.top_k < vocab for p in params):
            k_max = max(min(p.top_k, vocab) or vocab for p in params)
            top = torch.topk(scaled, k_max, dim=-1).values
            kth = top.gather(1, (top_k - 1).clamp(max=k_max - 1))
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if any(p.top_p < 1.0 for p in params):
            sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            drop = cumulative - sorted_probs > top_p  # keep the smallest prefix reaching top_p
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs.masked_fill(drop, 0.0))
        noise = torch.empty_like(probs)
        for i, req in enumerate(requests):
            noise[i].exponential_(generator=req.generator)
        return torch.argmax(probs / noise, dim=-1)

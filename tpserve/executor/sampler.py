"""Token sampling that gives the same tokens on every rank, alone or in any batch: one batched launch, no generators.

A random row keeps the tokens at or above one threshold (temperature, then min_p, top-k and top-p: vLLM's order)
and draws ``argmax(x + g)`` over them (Gumbel-max, a draw from their softmax), where the Gumbel noise ``g`` of
token v is Philox4x32-10 of (the request's seed, its sample counter, v): a pure function, so a seeded request
draws the same tokens alone or batched, at any row, on every rank, and again after a preemption (the counter
is the index of the output token being drawn, rebuilt from the request's outputs). Greedy rows take the argmax.
All rows go through ``tpserve.kernels.sample``: one sort-free Triton launch on CUDA, its torch reference elsewhere
(the same math and the same noise). ``torch.multinomial`` raises on NaN or inf probabilities (on CUDA a
device-side assert that kills the process); here NaN counts as -inf and +inf as the largest float, so one
request's row can never stop the batch, whatever its logits.

Before sampling, the rows that ask for it get vLLM's logits processing, in vLLM's order: ``logit_bias``, then
``repetition_penalty`` (prompt and generated tokens), ``frequency_penalty`` and ``presence_penalty``
(generated tokens). The generated-token counts live on the device, one int32 row per penalized request,
updated from the sampled ids without a host sync: no step does host work proportional to the vocabulary.

Log-probabilities come from the raw logits (vLLM's default ``raw_logprobs``): one ``log_softmax`` + ``topk``
over the rows that ask, packed with the sampled ids into one float64 tensor, so one copy brings both to the
host. Requests that ask for nothing pay nothing: the copy is then the sampled ids alone, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tpserve import kernels
from tpserve.executor.request import Request
from tpserve.kernels import reference

# One log-probability entry on the host and on the wire: [token_id, logprob, rank], the chosen token first,
# then the top k (rank 1 the most likely).
LogprobEntry = list[list[float | int]]


@dataclass
class PenaltyState:
    """A penalized request's device rows: generated-token counts, the prompt's tokens, its dense bias."""

    counts: torch.Tensor  # int32 [V]
    prompt_mask: torch.Tensor  # bool [V]
    bias: torch.Tensor | None  # float32 [V]


@dataclass
class PromptLogits:
    """What the runner hands the sampler for requests with ``prompt_logprobs``: the logits of the positions
    they score, the prompt token each position predicts, and whose positions they are."""

    logits: torch.Tensor  # float32 [P, V]
    targets: torch.Tensor  # int64 [P] on the device
    spans: list[tuple[Request, int, int]]  # (request, first position, end position): rows in order


@dataclass
class LogprobPlan:
    """Where a step's log-probabilities sit in the packed host tensor, and whose they are."""

    num_tokens: int  # the sampled ids come first
    sample_rows: list[int]  # rows of the sampled requests that asked, in block order
    sample_ks: list[int]  # each such row's own k
    sample_k: int  # the widest k: every block is this wide
    prompt_spans: list[tuple[Request, int, int]] = field(default_factory=list)
    prompt_k: int = 0

    def unpack(self, values: list[float]) -> tuple[list[int], dict[int, LogprobEntry], list[tuple[Request, int,
                                                                                                   LogprobEntry]]]:
        """(sampled ids, {row: entry} of the sampled rows that asked, [(request, position, entry)] of prompts)."""
        n = self.num_tokens
        tokens = [int(v) for v in values[:n]]
        at = n
        width = 3 + 2 * self.sample_k
        rows: dict[int, LogprobEntry] = {}
        for row, k in zip(self.sample_rows, self.sample_ks, strict=True):
            rows[row] = _entry(values[at : at + width], self.sample_k, k)
            at += width
        width = 3 + 2 * self.prompt_k
        prompt = []
        for req, lo, hi in self.prompt_spans:
            k = req.params.prompt_logprobs or 0
            for pos in range(lo, hi):
                prompt.append((req, pos + 1, _entry(values[at : at + width], self.prompt_k, k)))
                at += width
        return tokens, rows, prompt


def _entry(block: list[float], k_max: int, k: int) -> LogprobEntry:
    """[token, logprob, rank, k_max top ids, k_max top logprobs] -> the chosen token and its own top k."""
    entry: LogprobEntry = [[int(block[0]), block[1], int(block[2])]]
    ids, lps = block[3 : 3 + k_max], block[3 + k_max : 3 + 2 * k_max]
    entry.extend([int(ids[i]), lps[i], i + 1] for i in range(k))
    return entry


def logprob_block(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """float64 [n, 3 + 2k]: each row's target id, its log-probability and rank (how many tokens are at least as
    likely, itself included: vLLM's count, 1 for the most likely), then the k most likely ids and their
    log-probabilities."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    # A row of NaN logits must not make a NaN log-probability, which no wire or JSON carries.
    logprobs = torch.nan_to_num(logprobs, nan=float("-inf"), posinf=0.0)
    chosen = logprobs.gather(1, targets.view(-1, 1))
    rank = (logprobs >= chosen).sum(dim=-1, keepdim=True)
    parts = [targets.view(-1, 1).double(), chosen.double(), rank.double()]
    if k:
        top = torch.topk(logprobs, k, dim=-1)
        parts += [top.indices.double(), top.values.double()]
    return torch.cat(parts, dim=1)


class Sampler:
    """Samples a step's rows (per-row parameters, no host sync) and computes the log-probabilities asked for."""

    def __init__(self, device: torch.device, engine_seed: int) -> None:
        self.device = device
        self.engine_seed = engine_seed

    def seed_for(self, request: Request) -> int:
        """An explicit seed reproduces across runs; otherwise one derived from the engine seed and the request
        id, still identical on every rank."""
        if request.params.seed is not None:
            return request.params.seed
        return (self.engine_seed * 1_000_003 + request.request_id) % 2**63

    def _row(self, request: Request, vocab: int) -> np.ndarray:
        """The request's packed parameters (reference.SAMPLE_*), built at its first sampled step; the sample
        counter is filled in per step."""
        cached = request.sample_row
        if cached is not None and cached[0] == vocab:  # keyed by the vocabulary: top_k's "off" is its size
            return cached[1]
        p = request.params
        row = np.zeros(reference.SAMPLE_PARAMS, dtype=np.int32)
        if p.greedy:
            row[reference.SAMPLE_GREEDY] = 1
            row[reference.SAMPLE_INV_TEMP:] = np.array([1.0, 1.0, 0.0], np.float32).view(np.int32)
        else:
            seed = self.seed_for(request)
            row[reference.SAMPLE_SEED_LO] = np.uint32(seed & 0xFFFFFFFF).view(np.int32)
            row[reference.SAMPLE_SEED_HI] = np.uint32(seed >> 32).view(np.int32)
            row[reference.SAMPLE_INV_TEMP:] = np.array([1.0 / p.temperature, p.top_p, p.min_p],
                                                       np.float32).view(np.int32)
        row[reference.SAMPLE_TOP_K] = min(p.top_k, vocab) or vocab
        request.sample_row = (vocab, row)
        return row

    def row_params(self, requests: list[Request], vocab: int) -> torch.Tensor:
        """int32 [n, SAMPLE_PARAMS] on the device, one copy: each row's parameters and sample counter (the index
        of the output token it draws: rebuilt from the outputs, so a recomputed request draws the same noise)."""
        host = np.stack([self._row(r, vocab) for r in requests])
        host[:, reference.SAMPLE_OFFSET] = [len(r.output_token_ids) + r.num_pending for r in requests]
        pin = self.device.type == "cuda"  # pinned: a copy from pageable memory waits for the device
        tensor = torch.from_numpy(host)
        if pin:
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=pin)

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        pin = self.device.type == "cuda"  # pinned: a copy from pageable memory waits for the device
        return torch.tensor(values, dtype=dtype, pin_memory=pin).to(self.device, non_blocking=pin)

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """logits: float32 [S, V] for the requests in order (left as they are: the log-probabilities read the
        raw logits); returns int64 [S] on the device. An all-greedy step is one argmax; any other is one
        batched sampling launch over every row."""
        penalized = [i for i, req in enumerate(requests) if req.params.penalized]
        if penalized:
            logits = self.adjusted_logits(logits, requests, penalized)
        if all(req.params.greedy for req in requests):
            tokens = torch.argmax(logits, dim=-1)
        else:
            tokens = kernels.sample(logits, self.row_params(requests, logits.shape[1]))
        if penalized:
            self._count(tokens, requests, penalized)
        return tokens

    # -- logits processing -----------------------------------------------------------------------------

    def _state(self, req: Request, vocab: int) -> PenaltyState:
        """Created at the request's first sampled step: O(prompt + bias) host work once, never again."""
        state = req.penalty_state
        if state is None:
            mask = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            prompt = [t for t in req.prompt_token_ids if t < vocab]
            if prompt and req.params.repetition_penalty != 1.0:
                mask[self._to_device(prompt, torch.long)] = True
            bias = None
            if req.params.logit_bias:
                ids = [t for t in req.params.logit_bias if t < vocab]  # the executor refuses others
                bias = torch.zeros(vocab, dtype=torch.float32, device=self.device)
                if ids:
                    bias[self._to_device(ids, torch.long)] = self._to_device(
                        [req.params.logit_bias[t] for t in ids], torch.float32)
            state = req.penalty_state = PenaltyState(torch.zeros(vocab, dtype=torch.int32, device=self.device),
                                                     mask, bias)
        return state

    def adjusted_logits(self, logits: torch.Tensor, requests: list[Request], rows: list[int] | None = None
                        ) -> torch.Tensor:
        """``logits`` with bias and penalties applied to ``rows`` (default: every penalized request), as a new
        tensor: the raw logits stay for the log-probabilities."""
        if rows is None:
            rows = [i for i, req in enumerate(requests) if req.params.penalized]
        if not rows:
            return logits
        vocab = logits.shape[1]
        states = [self._state(requests[i], vocab) for i in rows]
        params = [requests[i].params for i in rows]
        index = self._to_device(rows, torch.long)
        x = logits.index_select(0, index).float()
        if any(s.bias is not None for s in states):
            zero = torch.zeros(vocab, dtype=torch.float32, device=self.device)
            x = x + torch.stack([s.bias if s.bias is not None else zero for s in states])
        counts = torch.stack([s.counts for s in states])
        per_row = self._to_device([[p.repetition_penalty, p.frequency_penalty, p.presence_penalty] for p in params],
                                  torch.float32)
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = (counts > 0) | torch.stack([s.prompt_mask for s in states])
            rep = per_row[:, 0:1]
            x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
            x = x - per_row[:, 1:2] * counts - per_row[:, 2:3] * (counts > 0)
        return logits.float().index_copy(0, index, x)

    def _count(self, tokens: torch.Tensor, requests: list[Request], rows: list[int]) -> None:
        """Adds each penalized row's sampled id to its counts, on the device (the host never sees the id here)."""
        one = torch.ones(1, dtype=torch.int32, device=self.device)
        for i in rows:
            state = requests[i].penalty_state
            assert state is not None
            state.counts.index_add_(0, tokens[i : i + 1], one)

    def probabilities(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """What a random row samples from, by the definitions (a sort for top-p): temperature, min_p, top-k and
        top-p. Not on the serving path: the reference the batched sampler's distribution is tested against."""
        n, vocab = logits.shape
        params = [r.params for r in requests]
        per_row = self._to_device([[p.temperature, p.top_p, min(p.top_k, vocab) or vocab, p.min_p] for p in params],
                                  torch.float32)
        temperature, top_p, top_k, min_p = per_row[:, 0:1], per_row[:, 1:2], per_row[:, 2:3].long(), per_row[:, 3:4]
        scaled = logits.float() / temperature
        if any(p.min_p > 0.0 for p in params):
            probs = torch.softmax(scaled, dim=-1)
            scaled = scaled.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
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
        return probs

    # -- log-probabilities -----------------------------------------------------------------------------

    def logprob_plan(self, requests: list[Request], prompt: PromptLogits | None) -> LogprobPlan | None:
        """None when no sampled row asks for log-probabilities and no prompt is scored: the common step."""
        rows = [i for i, req in enumerate(requests) if req.params.logprobs is not None]
        if not rows and prompt is None:
            return None
        ks = [requests[i].params.logprobs or 0 for i in rows]
        plan = LogprobPlan(len(requests), rows, ks, max(ks, default=0))
        if prompt is not None:
            plan.prompt_spans = prompt.spans
            plan.prompt_k = max(req.params.prompt_logprobs or 0 for req, _, _ in prompt.spans)
        return plan

    def pack(self, plan: LogprobPlan, logits: torch.Tensor, tokens: torch.Tensor,
             prompt: PromptLogits | None) -> torch.Tensor:
        """One flat float64 device tensor: the sampled ids, then the sampled rows' blocks, then the prompt's."""
        parts = [tokens.double()]
        if plan.sample_rows:
            index = self._to_device(plan.sample_rows, torch.long)
            parts.append(logprob_block(logits.index_select(0, index), tokens.index_select(0, index),
                                       plan.sample_k).flatten())
        if prompt is not None:
            parts.append(logprob_block(prompt.logits, prompt.targets, plan.prompt_k).flatten())
        return torch.cat(parts)

"""Penalties, ``min_p`` and ``logit_bias`` against a plain reference implementation of their definitions:
the modified distributions step by step in the sampler (rows that use them mixed with rows that use none),
and greedy outcomes end to end against Hugging Face logits with the reference applied."""

from __future__ import annotations

import dataclasses
import math
import os
import random

import torch
from helpers import _hf_model, built_model

from tpserve import LLM, SamplingParams
from tpserve.executor.request import Request
from tpserve.executor.sampler import Sampler

VOCAB = 50


def reference_logits(logits: list[float], params: SamplingParams, prompt: list[int], outputs: list[int]) -> list[float]:
    """The definitions, one token at a time: logit_bias (OpenAI: added), repetition_penalty (vLLM: tokens of
    the prompt or the output, divided when positive, multiplied otherwise), frequency_penalty (OpenAI: minus
    penalty x count in the output) and presence_penalty (minus penalty once present in the output)."""
    out = list(logits)
    for t, b in (params.logit_bias or {}).items():
        out[t] += b
    seen = set(prompt) | set(outputs)
    for t in range(len(out)):
        if t in seen:
            r = params.repetition_penalty
            out[t] = out[t] / r if out[t] > 0 else out[t] * r
        count = outputs.count(t)
        out[t] -= params.frequency_penalty * count + params.presence_penalty * (count > 0)
    return out


def reference_probs(logits: list[float], params: SamplingParams) -> list[float]:
    """Temperature, then min_p (vLLM: drop tokens less likely than min_p x the most likely), renormalized."""
    scaled = [x / params.temperature for x in logits]
    top = max(scaled)
    p = [math.exp(x - top) for x in scaled]
    total = sum(p)
    p = [x / total for x in p]
    keep = [x if x >= params.min_p * max(p) else 0.0 for x in p]
    total = sum(keep)
    return [x / total for x in keep]


ROWS = [
    SamplingParams(temperature=0),  # uses nothing
    SamplingParams(temperature=0, presence_penalty=1.5),
    SamplingParams(temperature=0, frequency_penalty=0.7),
    SamplingParams(temperature=0, repetition_penalty=1.8),
    SamplingParams(temperature=0, logit_bias={3: 4.0, 7: -100.0, 49: 2.5}),
    SamplingParams(temperature=0.9, seed=1, min_p=0.2),
    SamplingParams(temperature=0.7, seed=2),  # random, uses nothing
    SamplingParams(temperature=1.3, seed=3, presence_penalty=-0.5, frequency_penalty=1.1, repetition_penalty=0.6,
                   logit_bias={1: -3.0}, min_p=0.05),
    SamplingParams(temperature=0, presence_penalty=2.0, frequency_penalty=-2.0, repetition_penalty=1.3,
                   logit_bias={0: 100.0, 2: 1.0}),
]


def test_sampler_matches_the_definitions_step_by_step():
    rng = random.Random(0)
    sampler = Sampler(torch.device("cpu"), 0)
    requests = [Request(i, [rng.randrange(VOCAB) for _ in range(rng.randint(1, 8))], p, False)
                for i, p in enumerate(ROWS)]
    for _ in range(12):
        # few distinct large values: repeated tokens, and penalties that change the argmax
        logits = torch.tensor([[rng.choice([-3.0, -1.0, 0.5, 2.0, 4.0]) + rng.random() for _ in range(VOCAB)]
                               for _ in requests])
        expected = [reference_logits(logits[i].tolist(), r.params, r.prompt_token_ids, r.output_token_ids)
                    for i, r in enumerate(requests)]
        adjusted = sampler.adjusted_logits(logits, requests)
        assert torch.allclose(adjusted, torch.tensor(expected), atol=1e-5)
        random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        probs = sampler.probabilities(adjusted[random_rows], [requests[i] for i in random_rows])
        ref = torch.tensor([reference_probs(expected[i], requests[i].params) for i in random_rows])
        assert torch.allclose(probs, ref, atol=1e-6)
        tokens = sampler.sample(logits, requests).tolist()
        for i, (r, t) in enumerate(zip(requests, tokens, strict=True)):
            if r.params.greedy:
                assert t == max(range(VOCAB), key=lambda v: expected[i][v])  # noqa: B023
            else:
                assert ref[random_rows.index(i)][t] > 0  # never a token min_p (or a -inf bias) removed
            r.output_token_ids.append(t)
    assert requests[0].penalty_state is None  # a row that uses nothing keeps no device state
    # the device counts are the outputs' counts
    for r in requests[1:5]:
        assert r.penalty_state.counts.tolist() == [r.output_token_ids.count(t) for t in range(VOCAB)]


def hf_greedy_with(model_dir, prompt: list[int], params: SamplingParams, n: int) -> list[int]:
    """Greedy decoding over Hugging Face's float32 logits with the reference definitions applied."""
    model = _hf_model(str(model_dir))
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([prompt + out])).logits[0, -1].float().tolist()
            adjusted = reference_logits(logits, params, prompt, out)
            out.append(max(range(len(adjusted)), key=adjusted.__getitem__))
    return out


def test_greedy_outcomes_match_hf_with_the_reference():
    """TP 2, rows with and without penalties in one batch. The random model never repeats a token by itself,
    so a bias lifts three tokens far above the rest: without penalties the first would repeat forever; each
    penalty makes the row move between them in its own way."""
    model_dir = built_model("llama")
    prompts = [[(i * 31 + j * 7) % 40 + 5 for j in range(6 + i)] for i in range(6)]
    lift = {100: 30.0, 200: 29.5, 300: 29.0, prompts[4][0]: 29.8}
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    params = [
        greedy,
        dataclasses.replace(greedy, logit_bias=lift, presence_penalty=2.0),
        dataclasses.replace(greedy, logit_bias=lift, frequency_penalty=1.5),
        dataclasses.replace(greedy, logit_bias={17: 100.0}, min_p=0.5),
        dataclasses.replace(greedy, logit_bias=lift, repetition_penalty=1.05),
        dataclasses.replace(greedy, logit_bias=lift, frequency_penalty=0.8, presence_penalty=-1.0,
                            repetition_penalty=1.1),
    ]
    os.environ["TPSERVE_CHECK_RANKS"] = "1"  # every publish compared across ranks
    try:
        llm = LLM(model=str(model_dir), tensor_parallel_size=2, max_seq_len=64, max_batch_size=8)
    finally:
        del os.environ["TPSERVE_CHECK_RANKS"]
    with llm:
        outs = llm.generate(prompts, params)
        again = llm.generate(prompts[:1], params[:1])[0].token_ids
    assert outs[0].token_ids == again  # the row that uses nothing is unchanged by its neighbours
    assert outs[3].token_ids == [17] * 12
    for p, sp, out in zip(prompts, params, outs, strict=True):
        assert out.token_ids == hf_greedy_with(model_dir, p, sp, 12), sp
    # each row's penalties changed its tokens: a sampler that ignored them would fail the comparison above
    for i in (1, 2, 4, 5):
        bias_only = dataclasses.replace(params[i], presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0)
        assert outs[i].token_ids != hf_greedy_with(model_dir, prompts[i], bias_only, 12), params[i]

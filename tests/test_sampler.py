"""The batched sampler: its noise (Philox against Random123's answers), its distributions against the per-row
definitions (``Sampler.probabilities``), reproducibility of a seeded row alone and in any batch, rows of NaN and
inf, and the Triton kernel against the torch reference in Triton's interpreter (when triton is installed)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tpserve import SamplingParams
from tpserve.executor.request import Request
from tpserve.executor.sampler import Sampler
from tpserve.kernels import reference

VOCAB = 12
DRAWS = 12_000


def request(i: int, params: SamplingParams, outputs: int = 0) -> Request:
    req = Request(i, [1, 2, 3], params, False)
    req.output_token_ids = [0] * outputs
    return req


def test_philox_matches_random123_known_answers():
    """Random123's kat_vectors for philox4x32-10 (first word): a wrong round or key schedule changes them."""
    cases = [((0, 0), (0, 0), 0x6627E8D5), ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), None),
             ((0x243F6A88, 0x85A308D3), (0xA4093822, 0x299F31D0), None)]
    (c, k, want), *_ = cases
    got = reference.philox4x32(torch.tensor(c[0]), torch.tensor(c[1]), torch.tensor(k[0]), torch.tensor(k[1]))
    assert [int(w) for w in got] == [want, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    # the full counters of the other two vectors have non-zero c2, c3: check through the round function
    full = [((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, 0x408F276D), ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
                                                                   (0xA4093822, 0x299F31D0), 0xD16CFE09)]
    for ctr, key, want in full:
        c0, c1, c2, c3 = (torch.tensor(v) for v in ctr)
        k0, k1 = (torch.tensor(v) for v in key)
        for _ in range(10):
            hi0, lo0 = reference._mulhilo(reference._PHILOX_M0, c0)
            hi1, lo1 = reference._mulhilo(reference._PHILOX_M1, c2)
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
            k0, k1 = (k0 + reference._PHILOX_W0) & 0xFFFFFFFF, (k1 + reference._PHILOX_W1) & 0xFFFFFFFF
        assert int(c0) == want


def test_noise_is_gumbel():
    """Mean 0.5772 (Euler-Mascheroni), variance pi^2/6, and every counter and token gives other noise."""
    tokens = torch.arange(200_000)
    g = reference.gumbel_noise(tokens, torch.tensor(3), torch.tensor(11), torch.tensor(0))
    assert abs(g.mean().item() - 0.5772) < 0.01
    assert abs(g.var().item() - 1.6449) < 0.03
    other = reference.gumbel_noise(tokens, torch.tensor(4), torch.tensor(11), torch.tensor(0))
    assert (g != other).float().mean() > 0.999
    assert g.min() > -2.9 and g.max() < 16.7  # within the bound FLOOR_GAP relies on
    rows = reference.gumbel_rows(torch.tensor([3, 4]), torch.tensor([11, 11]), torch.tensor([0, 0]), 1001)
    assert torch.equal(rows[0], g[:1001]) and torch.equal(rows[1], other[:1001])  # the dense path: the same noise


PARAMS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=1.7, top_k=3),
    SamplingParams(temperature=0.8, top_p=0.9),
    SamplingParams(temperature=1.0, top_p=0.5),
    SamplingParams(temperature=1.3, min_p=0.1),
    SamplingParams(temperature=0.9, top_k=5, top_p=0.8),
    SamplingParams(temperature=1.1, top_k=6, top_p=0.7, min_p=0.05),
    SamplingParams(temperature=2.0, top_p=0.95, min_p=0.2),
    SamplingParams(temperature=1.0, top_k=1),
]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_distribution_matches_the_definitions(params):
    """DRAWS draws of one row (the sample counter advancing) against the per-row reference probabilities:
    no token the reference removes, and a chi-square on the kept ones far from rejecting (the draws are
    seeded: the test is deterministic)."""
    gen = torch.Generator().manual_seed(PARAMS.index(params))
    logits = (torch.randn(1, VOCAB, generator=gen) * 1.5).repeat(DRAWS, 1)
    sampler = Sampler(torch.device("cpu"), 0)
    seeded = dataclasses.replace(params, seed=1234)
    requests = [request(0, seeded) for _ in range(DRAWS)]
    for n, req in enumerate(requests):
        req.num_pending = n  # the counter: the n-th draw (cheaper than n outputs)
    tokens = sampler.sample(logits, requests)
    probs = sampler.probabilities(logits[:1], requests[:1])[0].double()
    probs = probs / probs.sum()  # top-p's reference leaves the kept mass unnormalized
    counts = torch.bincount(tokens, minlength=VOCAB).double()
    assert counts[probs == 0].sum() == 0, (counts, probs)
    kept = probs > 0
    expected = probs[kept] * DRAWS
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum().item()
    dof = max(int(kept.sum()) - 1, 1)
    assert chi2 < dof + 6 * (2 * dof) ** 0.5 + 10, (chi2, dof, counts.tolist(), expected.tolist())
    assert 0.5 * (counts / DRAWS - probs).abs().sum() < 0.03


def test_a_seeded_row_draws_the_same_tokens_alone_and_in_any_batch():
    rng = random.Random(0)
    vocab = 300
    gen = torch.Generator().manual_seed(0)
    sampler = Sampler(torch.device("cpu"), 5)
    mine = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.01, seed=77)
    steps = [torch.randn(vocab, generator=gen) * 2 for _ in range(6)]
    alone = request(0, mine)
    expected = []
    for logits in steps:
        expected.append(int(sampler.sample(logits.view(1, -1), [alone])[0]))
        alone.output_token_ids.append(expected[-1])
    assert len(set(expected)) > 1
    for trial in range(5):
        me = request(100 + trial, mine)  # another id: a seed is the request's, whatever its id
        others = [request(rng.randrange(1000), p) for p in rng.sample(PARAMS + [SamplingParams(temperature=0)], 6)]
        for step, logits in enumerate(steps):
            batch = others[:]
            at = rng.randrange(len(batch) + 1)
            batch.insert(at, me)
            rows = torch.randn(len(batch), vocab, generator=gen) * 3
            rows[at] = logits
            tokens = sampler.sample(rows, batch)
            assert int(tokens[at]) == expected[step], (trial, step)
            for r, t in zip(batch, tokens.tolist(), strict=True):
                r.output_token_ids.append(t)


def test_the_counter_is_rebuilt_from_the_outputs():
    """A request recomputed after a preemption (its outputs kept, maybe one still on the device) draws what it
    would have drawn: the counter is the index of the output token being drawn."""
    sampler = Sampler(torch.device("cpu"), 0)
    params = SamplingParams(temperature=1.0, seed=3)
    logits = torch.zeros(4, 1000)
    first = request(0, params)
    draws = []
    for _ in range(4):
        draws.append(int(sampler.sample(logits[:1], [first])[0]))
        first.output_token_ids.append(draws[-1])
    resumed = request(1, params)
    resumed.output_token_ids = draws[:2]
    assert int(sampler.sample(logits[:1], [resumed])[0]) == draws[2]
    resumed.num_pending = 1  # the third is on the device, not yet known: the fourth is drawn
    assert int(sampler.sample(logits[:1], [resumed])[0]) == draws[3]
    assert len(set(draws)) == 4  # a flat row: the noise alone picks


def test_unseeded_rows_differ_by_request_and_engine_seed():
    logits = torch.zeros(1, 5000)
    params = SamplingParams(temperature=1.0)
    a = Sampler(torch.device("cpu"), 0)
    b = Sampler(torch.device("cpu"), 1)
    tokens = {int(s.sample(logits, [request(i, params)])[0]) for s in (a, b) for i in range(4)}
    assert len(tokens) == 8
    assert int(a.sample(logits, [request(2, params)])[0]) == int(a.sample(logits, [request(2, params)])[0])


def test_rows_of_nan_and_inf_never_raise():
    vocab = 64
    nan = float("nan")
    inf = float("inf")
    rows = torch.randn(7, vocab)
    rows[0] = nan
    rows[1, 5] = nan
    rows[2] = -inf
    rows[3, 9] = inf
    rows[4, 10] = inf
    rows[4, 20] = inf
    rows[5, :] = inf
    rows[6] = torch.finfo(torch.float32).max  # every token the same huge value
    sampler = Sampler(torch.device("cpu"), 0)
    params = [SamplingParams(temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, seed=1),
              SamplingParams(temperature=1.0, top_p=0.5, seed=2)]
    for p in params:
        tokens = sampler.sample(rows, [request(i, p) for i in range(7)]).tolist()
        assert all(0 <= t < vocab for t in tokens)
        assert tokens[1] != 5 and tokens[3] == 9 and tokens[4] in (10, 20)


def test_greedy_rows_in_a_random_batch_take_the_argmax():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 400, generator=gen)
    sampler = Sampler(torch.device("cpu"), 0)
    batch = [request(i, SamplingParams(temperature=0 if i % 2 == 0 else 1.0, seed=i)) for i in range(5)]
    tokens = sampler.sample(logits, batch)
    assert tokens[0::2].tolist() == torch.argmax(logits[0::2], dim=-1).tolist()


# -- the Triton kernel, in the interpreter --------------------------------------------------------------------

KERNEL_CHECK = textwrap.dedent("""
    import torch
    from tpserve import SamplingParams
    from tpserve.executor.request import Request
    from tpserve.executor.sampler import Sampler
    from tpserve.kernels import reference, sampling

    sampling.BLOCK, sampling.CAP = 128, 64  # small tiles and scratch: flat rows need several bracket passes
    gen = torch.Generator().manual_seed(0)
    vocab = 1000
    kinds = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_p=0.9, seed=5),
             SamplingParams(temperature=1.0, seed=9), SamplingParams(temperature=1.0, top_k=40, seed=2**40 + 1),
             SamplingParams(temperature=0.7, top_k=300, top_p=0.95), SamplingParams(temperature=1.2, min_p=0.05),
             SamplingParams(temperature=0.8, top_p=0.5, min_p=0.01), SamplingParams(temperature=1.0, top_k=1000,
             top_p=0.99, min_p=0.001), SamplingParams(temperature=0.9, top_k=7, top_p=0.6)]
    scales = [0.02, 0.3, 1.0, 3.0, 12.0]
    rows, reqs = [], []
    for i in range(27):
        rows.append(torch.randn(vocab, generator=gen) * scales[i % len(scales)])
        req = Request(i, [1], kinds[i % len(kinds)], False)
        req.output_token_ids = [0] * (i // 3)
        reqs.append(req)
    logits = torch.stack(rows)
    logits[3, 7] = float("nan")
    logits[4, 11] = float("inf")
    logits[5] = float("-inf")
    params = Sampler(torch.device("cpu"), 0).row_params(reqs, vocab)
    got = sampling.sample(logits, params).tolist()
    want = reference.sample(logits, params).tolist()
    print("MISMATCH" if got != want else "SAME", got, want)
    bf16 = logits[:9].bfloat16()
    got = sampling.sample(bf16, params[:9]).tolist()
    want = reference.sample(bf16, params[:9]).tolist()
    print("MISMATCH" if got != want else "SAME", got, want)
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernel_matches_the_reference_in_the_interpreter(tmp_path: Path):
    """The same tokens, row for row: the kernel's thresholds found by bracket search (several passes on the
    flat rows) and its noise equal the reference's sort and noise."""
    script = tmp_path / "check.py"
    script.write_text(KERNEL_CHECK)
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("SAME") for line in lines), out.stdout

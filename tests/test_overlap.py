"""The overlap loop and early first-token emission: exact in every mode, first tokens as early as the
host knows them, every rank in step."""

import json
import os
import random
import time
from pathlib import Path

import pytest
from helpers import built_model, hf_greedy

from tpserve import LLM, SamplingParams

MODES = {
    "plain": {"enable_overlap": False},
    "overlap": {"enable_overlap": True, "early_first_token": False},
    "overlap+early": {"enable_overlap": True, "early_first_token": True},
}
PROMPTS = [[(i * 131 + j * 7) % 49000 + 3 for j in range(n)] for i, n in enumerate([4, 11, 23, 6])]
REF_TOKENS = 8


@pytest.fixture(scope="module")
def reference() -> dict[int, list[int]]:
    model = built_model("llama")
    return {i: hf_greedy(model, p, REF_TOKENS) for i, p in enumerate(PROMPTS)}


def expected_chunks(n: int, interval: int) -> list[int]:
    """Chunk sizes of a request that ends with n tokens: the first token, every ``interval``, the end."""
    rest = n - 1
    return [1] + [interval] * (rest // interval) + ([rest % interval] if rest % interval else [])


def workload(reference):
    """(prompt, params, expected tokens, finish reason) for max_tokens {1, 2, 7} x {stop, length}."""
    cases = []
    for i, prompt in enumerate(PROMPTS):
        ref = reference[i]
        for max_tokens in (1, 2, 7):
            cases.append((prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                          ref[:max_tokens], "length"))
            # stop on the token at the last position that is new in the sequence, before max_tokens
            k = max(j for j in range(max_tokens) if ref[j] not in ref[:j])
            stop = ref[k]
            cases.append((prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                                 stop_token_ids=[stop]), ref[: k + 1], "stop"))
    return cases


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("interval", [1, 2, 4])
@pytest.mark.parametrize("mode", list(MODES))
def test_parity_grid(reference, mode, interval, tp):
    cases = workload(reference)
    with LLM(model=str(built_model("llama")), tensor_parallel_size=tp, max_seq_len=64, max_batch_size=8,
             stream_interval=interval, **MODES[mode]) as llm:
        streams = []
        for n, (prompt, params, _, _) in enumerate(cases):
            streams.append(llm.generate_stream(prompt, params) if n % 2 == 0
                           else llm.generate_async(prompt, params, streaming=False))
            if n == len(cases) // 2:
                time.sleep(0.05)  # the second half arrives while the first half runs
        for n, ((_, params, tokens, reason), s) in enumerate(zip(cases, streams, strict=True)):
            chunks = list(s)
            label = f"case {n} max_tokens={params.max_tokens} stop={params.stop_token_ids}"
            assert s.output.token_ids == tokens, label
            assert s.output.finish_reason == reason, label
            assert sum((c.token_ids for c in chunks), []) == tokens, label
            sizes = [len(c.token_ids) for c in chunks]
            assert sizes == (expected_chunks(len(tokens), interval) if n % 2 == 0 else [len(tokens)]), label
            assert [c.finished for c in chunks] == [False] * (len(chunks) - 1) + [True], label


def read_events(directory: Path) -> dict[int, list[dict]]:
    out = {}
    for f in sorted(directory.glob("events.rank*.jsonl")):
        rank = int(f.name.removeprefix("events.rank").removesuffix(".jsonl"))
        out[rank] = [json.loads(line) for line in f.read_text().splitlines()]
    return out


def run_logged(tmp_path: Path, tp: int, mode: str, seed: int, n: int = 24) -> tuple[dict[int, list[dict]], list]:
    """A random mixed workload (streaming or not, stops, aborts, staggered arrivals) with event logs."""
    rng = random.Random(seed)
    log_dir = tmp_path / f"events-{mode}-{tp}-{seed}"
    os.environ["TPSERVE_EVENT_LOG"] = str(log_dir)
    try:
        llm = LLM(model=str(built_model("llama")), tensor_parallel_size=tp, max_seq_len=64, max_batch_size=6,
                  stream_interval=rng.choice([1, 2, 3]), **MODES[mode])
    finally:
        del os.environ["TPSERVE_EVENT_LOG"]
    with llm:
        streams = []
        for _ in range(n):
            prompt = [rng.randrange(3, 49000) for _ in range(rng.randint(1, 20))]
            params = SamplingParams(max_tokens=rng.randint(1, 9), temperature=rng.choice([0, 0.9]),
                                    seed=rng.randrange(100), stop_token_ids=[rng.randrange(3, 49000)],
                                    ignore_eos=True)
            streaming = rng.random() < 0.7
            stream = llm.generate_async(prompt, params, streaming=streaming)
            streams.append(stream)
            if rng.random() < 0.15:
                stream.abort()
            if rng.random() < 0.3:
                time.sleep(rng.random() * 0.02)
        for s in streams:
            s.result(timeout=60)
    return read_events(log_dir), streams


def strip_times(events: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "t"} for e in events]


@pytest.mark.parametrize("mode", list(MODES))
def test_every_rank_does_the_same_in_every_iteration(tmp_path, mode):
    events, _ = run_logged(tmp_path, tp=2, mode=mode, seed=5)
    assert set(events) == {0, 1}
    assert strip_times(events[0]) == strip_times(events[1])  # same publishes, collectives, schedules, order
    publishes = {}
    for e in events[0]:
        if e["ev"] == "publish":
            publishes.setdefault(e["it"], []).append(e["point"])
    points = ["early", "final"] if mode == "overlap+early" else ["final"]
    assert all(p == points for p in publishes.values())  # a publish at every point of every iteration


@pytest.mark.parametrize("mode", list(MODES))
def test_first_token_is_published_as_soon_as_the_host_has_it(tmp_path, mode):
    events, streams = run_logged(tmp_path, tp=2, mode=mode, seed=11)
    log = events[0]
    first_published = {}
    for pos, e in enumerate(log):
        if e["ev"] == "publish":
            for rid in e["first"]:
                assert rid not in first_published, f"request {rid}: first token published twice"
                first_published[rid] = (pos, e)
    host_has_it = {}
    for pos, e in enumerate(log):
        if e["ev"] == "update":
            for rid in e["first"]:
                host_has_it[rid] = (pos, e)
    streaming = {s.request_id for s in streams if s.streaming}
    checked = 0
    for rid, (pos, pub) in first_published.items():
        upd_pos, upd = host_has_it.get(rid, (None, None))
        if rid not in streaming or upd is None:
            continue  # a non-streamed request publishes once, at its end
        assert upd_pos < pos and upd["it"] == pub["it"], f"request {rid}"
        launches = [i for i, e in enumerate(log) if e["ev"] == "sample_launch" and e["it"] == pub["it"]]
        if mode == "overlap+early":
            assert pub["point"] == "early"
            assert not launches or pos < launches[0], f"request {rid}: published after sampling k launched"
        else:
            assert pub["point"] == "final"
            if mode == "overlap" and launches:
                assert pos > launches[0]
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_request_receives_its_first_token_twice(tmp_path, seed):
    events, streams = run_logged(tmp_path, tp=1, mode="overlap+early", seed=seed, n=30)
    counts = {}
    for e in events[0]:
        if e["ev"] == "publish":
            for rid, tokens, finished, _ in e["deltas"]:
                counts.setdefault(rid, []).append((tokens, finished))
    for s in streams:
        out = s.output
        assert out.finished
        deltas = counts.get(s.request_id, [])
        assert sum(1 for _, fin in deltas if fin) == 1, f"request {s.request_id} ended {deltas}"
        assert sum((t for t, _ in deltas), []) == out.token_ids  # nothing duplicated or lost
        if out.finish_reason != "abort":
            assert all(t for t, fin in deltas if not fin), "only a final chunk may be empty"


def test_rank_divergence_is_caught_with_a_message():
    os.environ.update(TPSERVE_CHECK_RANKS="1", TPSERVE_FAULT_DIVERGE="1:4")
    try:
        llm = LLM(model=str(built_model("llama")), tensor_parallel_size=2, max_seq_len=64)
    finally:
        del os.environ["TPSERVE_CHECK_RANKS"], os.environ["TPSERVE_FAULT_DIVERGE"]
    with llm:
        start = time.monotonic()
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
        assert time.monotonic() - start < 20
        assert out.finish_reason == "error"
        assert "ranks diverged at iteration 4" in out.error and "ranks [1]" in out.error, out.error


@pytest.mark.parametrize("tp", [1, 2])
def test_first_token_stop_and_tiny_temperatures_end_alone(reference, tp):
    """Issue 8: a request whose first token stops it (in a batch beside a normal one) killed every rank in
    the overlap loop; a tiny temperature overflowed the logits. Now each ends alone, in every mode."""
    for mode in MODES:
        with LLM(model=str(built_model("llama")), tensor_parallel_size=tp, max_seq_len=64, max_batch_size=8,
                 **MODES[mode]) as llm:
            normal = SamplingParams(max_tokens=REF_TOKENS, temperature=0, ignore_eos=True)
            stop_first = SamplingParams(max_tokens=REF_TOKENS, temperature=0, ignore_eos=True,
                                        stop_token_ids=[reference[0][0]])
            streams = [llm.generate_stream(PROMPTS[0], stop_first), llm.generate_stream(PROMPTS[1], normal)]
            for t in (1e-40, 1e-300, 5e-324):
                streams.append(llm.generate_stream(PROMPTS[2], SamplingParams(max_tokens=REF_TOKENS, temperature=t,
                                                                               ignore_eos=True)))
            outs = [s.result(timeout=60) for s in streams]
            assert (outs[0].token_ids, outs[0].finish_reason) == (reference[0][:1], "stop"), mode
            assert outs[1].token_ids == reference[1], mode
            assert all(o.token_ids == reference[2] for o in outs[2:]), mode  # tiny temperature == greedy
            after = llm.generate([PROMPTS[3], PROMPTS[0]], normal, use_tqdm=False)
            assert [o.token_ids for o in after] == [reference[3], reference[0]], mode
            assert llm.stats()["dead"] is None

"""The real ``Executor`` and ``Scheduler`` over a fake model (no MPI, no kernels), driven through every loop
order with random workloads: stop tokens at every position (the first included), aborts at any moment, id
reuse after an abort, max_tokens 1..n, stream_interval 1..4, and device events that are not ready yet (the
GPU order). Thousands of requests a second, so the races that a real engine hits once in a while are hit
here every run.

The fake model keeps a KV cache of its own, keyed by the KV location the executor gives each token, and
computes each next token from what that cache holds: a location freed while a step still used it, or
reused too early, changes the tokens and fails the comparison with the reference.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch

from tpserve import wire
from tpserve.executor.block_manager import BlockManager
from tpserve.executor.executor import Executor, ExecutorConfig
from tpserve.executor.model_runner import ModelRunner
from tpserve.executor.request import RequestDelta
from tpserve.executor.sampler import PromptLogits, Sampler
from tpserve.executor.scheduler import ScheduledBatch, Scheduler
from tpserve.sampling_params import SamplingParams

VOCAB = 40
EOS = 39
MAX_SEQ_LEN = 48


def next_token(seq: list[int]) -> int:
    """The fake model: a deterministic function of the whole sequence (so every cached token matters)."""
    h = 17
    for t in seq:
        h = (h * 31 + t + 1) % 1_000_003
    return h % VOCAB


def reference(prompt: list[int], params: SamplingParams, eos: tuple[int, ...]) -> tuple[list[int], str]:
    seq, out = list(prompt), []
    while True:
        t = next_token(seq)
        seq.append(t)
        out.append(t)
        if (not params.ignore_eos and t in eos) or t in params.stop_token_ids:
            return out, "stop"
        if len(out) >= params.max_tokens:
            return out, "length"


class FakeRunner:
    """Writes each scheduled token into its KV slot, then predicts from the slots of the whole sequence (and,
    for requests with prompt_logprobs, from the slots up to every prompt position it scores)."""

    def __init__(self, blocks: BlockManager) -> None:
        self.blocks = blocks
        self.kv: dict[int, int] = {}
        self.prompt_logits: PromptLogits | None = None

    def forward(self, batch: ScheduledBatch, prev_tokens: torch.Tensor | None = None,
                prev_rows: dict[int, int] | None = None) -> torch.Tensor:
        logits = torch.zeros(len(batch), VOCAB)
        for row, seq in enumerate(batch.seqs):
            req = seq.request
            rid = req.request_id
            known = req.prompt_token_ids + req.output_token_ids
            for pos in range(seq.start_pos, seq.start_pos + seq.num_tokens):
                if pos < len(known):
                    token = known[pos]
                else:  # sampled by the previous step, still "on the device"
                    assert prev_tokens is not None and prev_rows is not None and pos == len(known)
                    token = int(prev_tokens[prev_rows[rid]])
                self.kv[self.blocks.slot(rid, pos)] = token  # raises for a request without blocks
            end = seq.start_pos + seq.num_tokens
            logits[row, next_token([self.kv[self.blocks.slot(rid, p)] for p in range(end)])] = 50.0
        rows, targets, spans = ModelRunner.prompt_rows(batch)
        self.prompt_logits = None
        if rows:
            extra = torch.zeros(len(rows), VOCAB)
            row = 0
            for req, lo, hi in spans:
                for pos in range(lo, hi):
                    seen = [self.kv[self.blocks.slot(req.request_id, q)] for q in range(pos + 1)]
                    extra[row, next_token(seen)] = 50.0
                    row += 1
            self.prompt_logits = PromptLogits(extra, torch.tensor(targets), spans)
        return logits


class FakeEvent:
    """A device event that the host may find not ready yet (the order a busy GPU gives)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def query(self) -> bool:
        return self.rng.random() < 0.5

    def synchronize(self) -> None:
        pass


class FakeQueue:
    def __init__(self) -> None:
        self.items: list[wire.Message] = []

    def fetch(self, idle: bool) -> list[wire.Message]:
        items, self.items = self.items, []
        return items


@dataclass
class Life:
    """One request id's lifetime, as the proxy would see it."""

    prompt: list[int]
    params: SamplingParams
    stream: bool
    aborted: bool = False
    chunks: list[RequestDelta] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return bool(self.chunks) and self.chunks[-1].finished


def make_engine(rng: random.Random, mode: str, interval: int, gpu_order: bool):
    config = ExecutorConfig(VOCAB, MAX_SEQ_LEN, (EOS,), stream_interval=interval,
                            enable_overlap=mode != "plain", early_first_token=mode == "overlap+early")
    published: list[RequestDelta] = []
    block_size = rng.choice([1, 2, 4, 16])
    capacity = rng.choice([20, 32, 64, 400])  # tokens; the largest request needs 19: small pools preempt
    max_num_tokens = rng.choice([3, 8, 64])
    max_batch_size = min(rng.choice([1, 4, 16]), max_num_tokens)
    blocks = BlockManager(-(-capacity // block_size) + 1, block_size, enable_prefix_caching=rng.random() < 0.7,
                          max_seqs=max_batch_size, max_blocks_per_seq=-(-MAX_SEQ_LEN // block_size))
    scheduler = Scheduler(blocks, max_batch_size=max_batch_size,
                          max_num_tokens=max_num_tokens, max_chunk_tokens=rng.choice([None, 2, 5]))
    executor = Executor(config, FakeQueue(), scheduler, FakeRunner(blocks), Sampler(torch.device("cpu"), 0),
                        published.extend, torch.device("cpu"))
    if gpu_order:
        executor.new_event = lambda: FakeEvent(rng)
    return executor, published


def random_params(rng: random.Random, prompt: list[int]) -> SamplingParams:
    max_tokens = rng.randint(1, 7)
    ref, _ = reference(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), ())
    stops = [rng.choice(ref)] if rng.random() < 0.5 else []  # any position, the first included
    temperature = rng.choice([0.0, 0.0, 1e-40, 5e-324, 1.0])
    # Log-probabilities, and penalties and biases too small to move the fake model's argmax (50 above the
    # rest): they ride through every loop order, preemption and abort without changing a token.
    extras: dict = {}
    if rng.random() < 0.2:
        extras = {"presence_penalty": rng.uniform(-2, 2), "frequency_penalty": rng.uniform(-2, 2),
                  "repetition_penalty": rng.choice([1.0, 0.5, 3.0]), "min_p": rng.choice([0.0, 0.2]),
                  "logit_bias": {rng.randrange(VOCAB): rng.uniform(-5, 5)}}
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, stop_token_ids=stops,
                          ignore_eos=rng.random() < 0.5, seed=rng.choice([None, 7]),
                          logprobs=rng.choice([None] * 4 + [0, 3]), prompt_logprobs=rng.choice([None] * 4 + [0, 2]),
                          **extras)


def check_logprobs(label: str, life: Life, tokens: list[int]) -> None:
    """Each token's entry: the chosen token first with rank 1, then the top k (the fake model's argmax is the
    token); the prompt's entries score each prompt token against the fake model's prediction."""
    p = life.params
    entries = [e for c in life.chunks for e in (c.logprobs or [])]
    if p.logprobs is None:
        assert not entries, label
    else:
        assert len(entries) == len(tokens), label
        for token, entry in zip(tokens, entries, strict=True):
            assert len(entry) == 1 + p.logprobs and entry[0][0] == token and entry[0][2] == 1, (label, entry)
            assert all(e[0] == token for e in entry[1:2]), (label, entry)
    given = [c.prompt_logprobs for c in life.chunks if c.prompt_logprobs is not None]
    if p.prompt_logprobs is None or not tokens:
        assert not given, label
        return
    assert len(given) == 1 and len(given[0]) == len(life.prompt) and given[0][0] is None, label
    for j in range(1, len(life.prompt)):
        entry = given[0][j]
        predicted = next_token(life.prompt[:j])
        assert entry[0][0] == life.prompt[j], (label, j, entry)
        assert entry[0][2] == (1 if life.prompt[j] == predicted else VOCAB), (label, j, entry)
        assert len(entry) == 1 + p.prompt_logprobs and all(e[0] == predicted for e in entry[1:2]), (label, entry)


def run_workload(seed: int, mode: str, interval: int, gpu_order: bool) -> int:
    rng = random.Random(seed)
    executor, published = make_engine(rng, mode, interval, gpu_order)
    lives: dict[int, list[Life]] = {}
    next_id = 0
    cursor = 0

    def route() -> None:
        nonlocal cursor
        for delta in published[cursor:]:
            life = next((x for x in lives[delta.request_id] if not x.ended), None)
            assert life is not None, f"a response for request {delta.request_id} after its end: {delta}"
            life.chunks.append(delta)
        cursor = len(published)

    def submit(rid: int) -> None:
        prompt = [rng.randrange(VOCAB - 1) for _ in range(rng.randint(1, 12))]
        life = Life(prompt, random_params(rng, prompt), rng.random() < 0.7)
        lives.setdefault(rid, []).append(life)
        executor.queue.items.append(wire.Submit(rid, prompt, life.params.to_dict(), life.stream))

    for _ in range(rng.randint(20, 60)):
        for _ in range(rng.choice([0, 0, 1, 2, 5])):
            submit(next_id)
            next_id += 1
        live = [rid for rid, ls in lives.items() if not ls[-1].ended and not ls[-1].aborted]
        if live and rng.random() < 0.3:
            rid = rng.choice(live)
            lives[rid][-1].aborted = True
            executor.queue.items.append(wire.Abort(rid))
            if rng.random() < 0.5:  # the same id again, right after its abort
                submit(rid)
        executor.step()
        route()
    for _ in range(3000):  # let everything finish (bounded: mbs 1 and 2-token chunks are slow)
        if not executor.requests and executor.prev is None:
            break
        executor.step()
        route()
    route()

    for rid, ls in lives.items():
        for n, life in enumerate(ls):
            label = f"seed {seed} request {rid} life {n} {life.params}"
            assert life.ended, f"{label}: never ended"
            assert [c.finished for c in life.chunks].count(True) == 1, label
            tokens = sum((c.token_ids for c in life.chunks), [])
            ref, reason = reference(life.prompt, life.params, (EOS,))
            end = life.chunks[-1]
            if life.aborted:
                assert end.finish_reason in ("abort", reason), label
                assert tokens == ref[: len(tokens)], label
                if end.finish_reason == reason:
                    assert tokens == ref, label
            else:
                assert (tokens, end.finish_reason) == (ref, reason), label
            check_logprobs(label, life, tokens)
            if not life.stream:
                assert len(life.chunks) == 1, label
            elif tokens and end.finish_reason != "abort":
                sizes = [len(c.token_ids) for c in life.chunks if c.token_ids]
                assert sizes[0] == 1, label  # the first token alone, as early as it is known
    stats = executor.stats()
    assert stats["running"] == stats["waiting"] == 0
    assert stats["kv_cache_usage"] == 0
    assert not executor.requests
    return stats["num_preemptions"]


@pytest.mark.parametrize("gpu_order", [False, True])
@pytest.mark.parametrize("mode", ["plain", "overlap", "overlap+early"])
def test_random_workloads(mode, gpu_order):
    preemptions = [run_workload(seed, mode, interval=1 + seed % 4, gpu_order=gpu_order) for seed in range(60)]
    assert sum(p > 0 for p in preemptions) >= 5  # the small pools did preempt


def test_first_token_stop_beside_a_normal_request():
    """The crash of issue 8: a request whose first token ends it, in a batch with a neighbour."""
    for mode in ("plain", "overlap", "overlap+early"):
        for gpu_order in (False, True):
            rng = random.Random(0)
            executor, published = make_engine(rng, mode, 1, gpu_order)
            a, b = [1, 2, 3], [4, 5, 6, 7]
            first = next_token(a)
            executor.queue.items += [
                wire.Submit(0, a, SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[first]).to_dict(), True),
                wire.Submit(1, b, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True).to_dict(), True),
            ]
            for _ in range(20):
                executor.step()
            ends = {d.request_id: d for d in published if d.finished}
            assert ends[0].finish_reason == "stop" and ends[1].finish_reason == "length", mode
            assert sum((d.token_ids for d in published if d.request_id == 0), []) == [first]
            assert sum((d.token_ids for d in published if d.request_id == 1), []) == reference(
                b, SamplingParams(max_tokens=5, ignore_eos=True), ())[0]
            assert executor.stats()["kv_cache_usage"] == 0


@pytest.mark.parametrize("mode", ["plain", "overlap", "overlap+early"])
def test_a_request_whose_table_outgrows_its_row_fails_alone(mode: str) -> None:
    """The block-table row is the bound the copy to the device relies on: a request that would pass it (here
    a row of 2 blocks of 4 under a 48-token max_seq_len) ends with an error, its neighbours run on."""
    config = ExecutorConfig(VOCAB, MAX_SEQ_LEN, (EOS,), enable_overlap=mode != "plain",
                            early_first_token=mode == "overlap+early")
    published: list[RequestDelta] = []
    blocks = BlockManager(40, 4, max_seqs=4, max_blocks_per_seq=2)
    executor = Executor(config, FakeQueue(), Scheduler(blocks, 4, 16), FakeRunner(blocks),
                        Sampler(torch.device("cpu"), 0), published.extend, torch.device("cpu"))
    short, long = [1, 2, 3], list(range(1, 13))
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    executor.queue.items += [wire.Submit(1, short, params.to_dict()), wire.Submit(2, long, params.to_dict()),
                             wire.Submit(3, [4, 5], params.to_dict())]
    for _ in range(30):
        executor.step()
    ends = {d.request_id: d for d in published if d.finished}
    assert ends[2].finish_reason == "error" and "more than the 2 of a block-table row" in ends[2].error
    for rid, prompt in ((1, short), (3, [4, 5])):
        tokens = [t for d in published if d.request_id == rid for t in d.token_ids]
        assert (tokens, ends[rid].finish_reason) == reference(prompt, params, (EOS,))
    assert not executor.requests and blocks.num_free_blocks == 39


class OutOfMemoryRunner(FakeRunner):
    """Runs out of device memory at its ``fail_at``-th forward (what the caching allocator raises)."""

    def __init__(self, blocks: BlockManager, fail_at: int) -> None:
        super().__init__(blocks)
        self.calls = 0
        self.fail_at = fail_at

    def forward(self, batch, prev_tokens=None, prev_rows=None):
        self.calls += 1
        if self.calls == self.fail_at:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(batch, prev_tokens, prev_rows)


@pytest.mark.parametrize("mode", ["plain", "overlap", "overlap+early"])
def test_a_step_out_of_memory_ends_its_requests_and_the_engine_serves_on(mode: str) -> None:
    config = ExecutorConfig(VOCAB, MAX_SEQ_LEN, (EOS,), enable_overlap=mode != "plain",
                            early_first_token=mode == "overlap+early", recover_oom=True)
    published: list[RequestDelta] = []
    blocks = BlockManager(40, 4, max_seqs=4, max_blocks_per_seq=12)
    executor = Executor(config, FakeQueue(), Scheduler(blocks, 4, 16), OutOfMemoryRunner(blocks, fail_at=3),
                        Sampler(torch.device("cpu"), 0), published.extend, torch.device("cpu"))
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    executor.queue.items += [wire.Submit(1, [1, 2, 3], params.to_dict()), wire.Submit(2, [4, 5], params.to_dict())]
    for _ in range(4):
        executor.step()
    executor.queue.items.append(wire.Submit(3, [6, 7, 8], params.to_dict()))
    for _ in range(20):
        executor.step()
    ends = {d.request_id: d for d in published if d.finished}
    for rid in (1, 2):  # both were in the third step
        assert ends[rid].finish_reason == "error" and "out of memory in the forward" in ends[rid].error
    tokens = [t for d in published if d.request_id == 3 for t in d.token_ids]
    assert (tokens, ends[3].finish_reason) == reference([6, 7, 8], params, (EOS,))
    assert not executor.requests and blocks.num_free_blocks == 39


def test_out_of_memory_ends_the_engine_where_ranks_could_not_agree() -> None:
    config = ExecutorConfig(VOCAB, MAX_SEQ_LEN, (EOS,), recover_oom=False)
    blocks = BlockManager(40, 4)
    executor = Executor(config, FakeQueue(), Scheduler(blocks, 4, 16), OutOfMemoryRunner(blocks, fail_at=1),
                        Sampler(torch.device("cpu"), 0), lambda deltas: None, torch.device("cpu"))
    executor.queue.items.append(wire.Submit(1, [1, 2, 3], SamplingParams(max_tokens=2).to_dict()))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        executor.step()


class OutOfMemorySampler(Sampler):
    """Runs out of device memory at its ``fail_at``-th sampling launch."""

    def __init__(self, fail_at: int) -> None:
        super().__init__(torch.device("cpu"), 0)
        self.calls = 0
        self.fail_at = fail_at

    def sample(self, logits, requests):
        self.calls += 1
        if self.calls == self.fail_at:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return super().sample(logits, requests)


@pytest.mark.parametrize("mode", ["plain", "overlap", "overlap+early"])
def test_sampling_out_of_memory_ends_its_requests_and_the_engine_serves_on(mode: str) -> None:
    config = ExecutorConfig(VOCAB, MAX_SEQ_LEN, (EOS,), enable_overlap=mode != "plain",
                            early_first_token=mode == "overlap+early", recover_oom=True)
    published: list[RequestDelta] = []
    blocks = BlockManager(40, 4)
    executor = Executor(config, FakeQueue(), Scheduler(blocks, 4, 16), FakeRunner(blocks), OutOfMemorySampler(2),
                        published.extend, torch.device("cpu"))
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    executor.queue.items.append(wire.Submit(1, [1, 2, 3], params.to_dict()))
    for _ in range(3):
        executor.step()
    executor.queue.items.append(wire.Submit(2, [4, 5], params.to_dict()))
    for _ in range(20):
        executor.step()
    ends = {d.request_id: d for d in published if d.finished}
    assert ends[1].finish_reason == "error" and "out of memory in the sampling" in ends[1].error
    tokens = [t for d in published if d.request_id == 2 for t in d.token_ids]
    assert (tokens, ends[2].finish_reason) == reference([4, 5], params, (EOS,))
    assert not executor.requests and blocks.num_free_blocks == 39

"""The executor loop, run identically on every rank: plain or overlapped, with early first-token emission.

Plain iteration k: fetch items; schedule k; forward k; sample k; update; publish.
Overlap iteration k (the device keeps batch k-1's sampled tokens, so launching k needs no sync):
  1 fetch + broadcast new items; schedule k
  2 launch forward k (inputs from k-1's tokens still on the device)
  3 update the requests of k-1 (wait for k-1's sampling event while the device runs forward k)
  4 early emission: publish the responses of every request whose first token came from k-1
    (when those tokens are already on the host at step 1, steps 3-4 run before step 2: see below)
  5 launch sampling k (device -> pinned host copy + event)
  6 collect k-1's other responses
  7 free the requests whose end is decided: only now, after k's launches, since batch k (scheduled
    before k-1's tokens were known) may still hold a request that k-1's token ended; then publish (the
    "final" publish point)
Where a response is decided: ``_delta`` (one rule for first tokens, chunks and ends); published:
``_publish`` at two points, "early" and "final"; freed: ``_free_ended``.
Symmetry rule: every publish point publishes on every rank, an empty list where there is nothing, so
every rank makes the same collectives in the same order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tpserve import wire
from tpserve.executor.instrument import Instruments
from tpserve.executor.model_runner import ModelRunner
from tpserve.executor.request import Request, RequestDelta
from tpserve.executor.sampler import LogprobPlan, PromptLogits, Sampler
from tpserve.executor.scheduler import ScheduledBatch, Scheduler
from tpserve.executor.structured import GrammarManager
from tpserve.sampling_params import SamplingParams
from tpserve.shutdown_trace import Watchdog, phase_timer, trace

if TYPE_CHECKING:
    from tpserve.executor.request_queue import RequestQueue

Publisher = Callable[[list[RequestDelta]], None]


@dataclass
class ExecutorConfig:
    vocab_size: int
    max_seq_len: int
    eos_token_ids: tuple[int, ...]
    stream_interval: int = 1
    enable_overlap: bool = True
    early_first_token: bool = True
    # A CUDA out-of-memory error while launching a step ends that step's requests (with the reason) and the
    # engine serves on. Only where every rank can take that path alike: one rank (a rank that skips a step's
    # collectives while its peers enter them would hang them); elsewhere the error ends the engine.
    recover_oom: bool = False


@dataclass
class InFlight:
    """A step whose sampling was launched: its tokens reach the host when ``event`` completes."""

    batch: ScheduledBatch
    requests: list[Request]  # the sampled ones, in row order of ``tokens``
    tokens: torch.Tensor  # int64 [len(requests)] on the device
    host_tokens: torch.Tensor  # pinned host copy, valid after ``event``
    event: torch.cuda.Event | None
    rows: dict[int, int] = field(default_factory=dict)  # request_id -> row in ``tokens``
    has_first_tokens: bool = False  # some request gets its first token from this step
    # Where the step's log-probabilities sit in ``host_tokens`` (then float64: ids and log-probabilities in one
    # copy); None when nothing asked (``host_tokens`` holds the ids alone).
    logprobs: LogprobPlan | None = None

    def ready(self) -> bool:
        """Whether the host copy is complete, without waiting (always on CPU, where it is synchronous)."""
        return self.event is None or self.event.query()


class Executor:
    def __init__(
        self,
        config: ExecutorConfig,
        queue: RequestQueue,
        scheduler: Scheduler,
        runner: ModelRunner,
        sampler: Sampler,
        publish: Publisher,
        device: torch.device,
        hooks: Instruments | None = None,
    ) -> None:
        self.config = config
        self.queue = queue
        self.scheduler = scheduler
        self.runner = runner
        self.sampler = sampler
        self.publish = publish
        self.device = device
        self.requests: dict[int, Request] = {}
        self.deltas: list[RequestDelta] = []  # published at the end of the iteration
        self.ended: list[Request] = []  # end published or queued; freed after this iteration's launches
        self.new_event: Callable[[], torch.cuda.Event | None] = self._new_event
        self.shutting_down = False
        self.iteration = 0
        self.prev: InFlight | None = None
        self.hooks = hooks if hooks is not None else Instruments()  # debug hooks: no-ops unless switched on
        self.iteration_time = 0.0  # moving average of busy iterations, seconds
        self.drain_watch: Watchdog | None = None
        self.kernel_compiles: Callable[[], int] = lambda: 0  # Triton compiles since ready (GPU: variants.py)
        self._token_ring: list[torch.Tensor] = []
        self._ring_turn = 0
        self.grammars = GrammarManager(None)  # structured output; the engine gives it a backend (structured.py)

    @property
    def overlap(self) -> bool:
        return self.config.enable_overlap

    @property
    def done(self) -> bool:
        return self.shutting_down and not self.requests and self.prev is None

    def run(self) -> None:
        try:
            while not self.done:
                self.step()
        finally:
            self.grammars.close()
        if self.drain_watch is not None:
            self.drain_watch.stop()
        trace("executor_loop", "loop_exit", iteration=self.iteration)

    def step(self) -> None:
        self.hooks.on_step(self.iteration)
        idle = not self.requests and self.prev is None
        items = self.queue.fetch(idle=idle)
        start = time.perf_counter()
        self._log("fetch", items=len(items))
        self._handle_items(items)
        self._admit_grammars()
        batch = self.scheduler.schedule()
        if self.scheduler.failed:
            self._fail_unschedulable()
        for seq in batch.seqs:
            seq.request.stamp("first_scheduled")
        self.hooks.on_schedule(self.iteration, batch.seqs)
        if self.overlap:
            self._step_overlap(batch)
        else:
            self._step_plain(batch)
        if batch:
            self.iteration_time += 0.1 * (time.perf_counter() - start - self.iteration_time)
        self.iteration += 1

    def stats(self) -> dict[str, float | int | bool]:
        blocks = self.scheduler.blocks
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "iteration_time_s": self.iteration_time,
            "kv_cache_usage": blocks.usage,
            "prefix_cache_hit_rate": blocks.prefix_cache_hit_rate,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_free_blocks": blocks.num_free_blocks,
            "shutting_down": self.shutting_down,
            "triton_compiles": self.kernel_compiles(),
        }

    def _step_plain(self, batch: ScheduledBatch) -> None:
        logits = self._launch_forward(batch, None) if batch else None
        current = self._launch_sampling(batch, logits) if logits is not None else None
        if current is not None:
            self._update(current)
            self._collect(current)
        self._flush()

    def _step_overlap(self, batch: ScheduledBatch) -> None:
        """One of three orders, by what the host knows of step k-1 when iteration k starts."""
        prev = self.prev
        if not self.config.early_first_token:
            self._launch_then_update(batch, prev)
        elif prev is None or (prev.has_first_tokens and prev.ready()):
            self._emit_then_launch(batch, prev)
        else:
            self._launch_then_emit(batch, prev)

    def _emit_then_launch(self, batch: ScheduledBatch, prev: InFlight | None) -> None:
        """k-1's first tokens are already on the host (CPU; a launch-bound GPU): publish them, then launch k,
        whose launch alone can take a whole step."""
        self._emit_first_tokens(prev)
        self._finish_iteration(batch, self._launch_forward(batch, prev) if batch else None, prev)

    def _launch_then_emit(self, batch: ScheduledBatch, prev: InFlight) -> None:
        """The timeline's order: launch k, then wait for k-1's tokens and publish its first tokens."""
        logits = self._launch_forward(batch, prev) if batch else None
        self._emit_first_tokens(prev)
        self._finish_iteration(batch, logits, prev)

    def _launch_then_update(self, batch: ScheduledBatch, prev: InFlight | None) -> None:
        """No early emission: launch k, update k-1; its first tokens leave with the rest, at the end."""
        logits = self._launch_forward(batch, prev) if batch else None
        if prev is not None:
            self._update(prev)
        self._finish_iteration(batch, logits, prev)

    def _finish_iteration(self, batch: ScheduledBatch, logits: torch.Tensor | None, prev: InFlight | None) -> None:
        """Launch sampling k, collect k-1's other responses, free what ended (only now, after k's launches:
        batch k may still hold a request that k-1 ended) and publish."""
        self.prev = self._launch_sampling(batch, logits) if logits is not None else None
        if prev is not None:
            self._collect(prev)
        self._flush()

    def _emit_first_tokens(self, prev: InFlight | None) -> None:
        """Updates k-1 and publishes its first tokens: the one early publish of every iteration (empty
        when there is nothing, so every rank makes the same publishes)."""
        deltas = []
        if prev is not None:
            self._update(prev)
            firsts = [r for r in prev.requests if r.num_published == 0 and r.output_token_ids]
            deltas = [d for d in map(self._delta, firsts) if d is not None]
        self._publish(deltas, "early")

    # -- items -----------------------------------------------------------------------------------------

    def _handle_items(self, items: list[wire.Message]) -> None:
        for item in items:
            if isinstance(item, wire.Submit):
                self._add(item)
            elif isinstance(item, wire.Abort):
                req = self.requests.get(item.request_id)
                if req is not None:
                    self._end_now(req, "abort")
            elif isinstance(item, wire.Shutdown):
                trace("executor_loop", "sentinel_seen", drain=item.drain, iteration=self.iteration,
                      active=len(self.requests))
                self.shutting_down = True
                if self.drain_watch is None:  # a rank wedged here (a peer gone quiet) dumps its stacks
                    self.drain_watch = phase_timer("executor_loop", "drain_to_exit").start()
                if not item.drain:
                    for req in list(self.requests.values()):
                        self._end_now(req, "abort")
                trace("executor_loop", "drain", remaining=len(self.requests), in_flight=self.prev is not None)

    def _add(self, item: wire.Submit) -> None:
        rid = item.request_id
        if rid in self.requests:
            self.deltas.append(RequestDelta(rid, [], True, "error", f"duplicate request id {rid}"))
            return
        if self.shutting_down:
            self.deltas.append(RequestDelta(rid, [], True, "abort", "engine is shutting down"))
            return
        try:
            params = SamplingParams.from_dict(item.params)
            self._validate(item.prompt_token_ids, params)
        except (ValueError, TypeError) as e:
            self.deltas.append(RequestDelta(rid, [], True, "error", str(e)))
            return
        req = Request(rid, list(item.prompt_token_ids), params, item.stream)
        req.metrics["arrival_proxy"] = item.arrival_time
        req.metrics["arrival_rank0"] = item.rank0_time or time.time()  # the intake thread's clock
        self.requests[rid] = req
        if params.structured is not None:
            self.grammars.add(req)  # reaches the scheduler once its grammar is ready on every rank
        else:
            self.scheduler.add(req)

    def _admit_grammars(self) -> None:
        """Schedules the constrained requests whose grammar every rank has compiled; ends those whose grammar
        failed, alone, with the backend's reason. Waits a little for a compile only when nothing else runs."""
        if not self.grammars.pending:
            return
        idle = not self.scheduler.running and not self.scheduler.waiting and self.prev is None
        ready, failed = self.grammars.poll(wait=idle)
        for req in ready:
            self.scheduler.add(req)
        for req, why in failed:
            self._end_now(req, "error", why)

    def _fail_unschedulable(self) -> None:
        """Ends the requests the scheduler could not place (a block table longer than its row), each with its
        reason: the step goes on without them."""
        failed, self.scheduler.failed = self.scheduler.failed, []
        for req, why in failed:
            self._end_now(req, "error", why)

    def _validate(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise ValueError("prompt is empty")
        vocab = self.config.vocab_size
        for i, t in enumerate(prompt):
            if not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"prompt token id {t!r} at position {i} is outside the vocabulary [0, {vocab})")
        bad = next((t for t in params.logit_bias or () if t >= vocab), None)
        if bad is not None:
            raise ValueError(f"logit_bias token id {bad} is outside the vocabulary [0, {vocab})")
        if len(prompt) + params.max_tokens > self.config.max_seq_len:
            raise ValueError(
                f"prompt length {len(prompt)} + max_tokens {params.max_tokens} exceeds "
                f"max_seq_len {self.config.max_seq_len}"
            )
        blocks = self.scheduler.blocks
        capacity = (blocks.num_blocks - 1) * blocks.block_size
        if len(prompt) + params.max_tokens > capacity:
            raise ValueError(
                f"prompt length {len(prompt)} + max_tokens {params.max_tokens} can never fit the KV cache pool "
                f"of {capacity} tokens (kv_cache_tokens)"
            )

    # -- steps -----------------------------------------------------------------------------------------

    def _launch_forward(self, batch: ScheduledBatch, prev: InFlight | None) -> torch.Tensor | None:
        """The step's logits, or None when it ran out of memory and its requests were ended (``recover_oom``)."""
        self._log("forward")
        try:
            return self.runner.forward(batch, prev.tokens if prev else None, prev.rows if prev else None)
        except torch.cuda.OutOfMemoryError as e:
            self._out_of_memory(batch, "forward", e)
            return None

    def _launch_sampling(self, batch: ScheduledBatch, logits: torch.Tensor) -> InFlight | None:
        """The step's sampling in flight, or None when it ran out of memory (``recover_oom``)."""
        try:
            return self._sample(batch, logits)
        except torch.cuda.OutOfMemoryError as e:
            self._out_of_memory(batch, "sampling", e)
            return None

    def _out_of_memory(self, batch: ScheduledBatch, where: str, error: Exception) -> None:
        """Ends the step's requests with the reason and gives the cached memory back; the next step runs
        without them. The KV they wrote is theirs alone and is freed with them at the end of the iteration."""
        if not self.config.recover_oom:
            raise error
        tokens = sum(s.num_tokens for s in batch.seqs)
        why = (f"out of memory in the {where} of a step of {tokens} tokens over {len(batch)} requests; "
               f"the request ended, the engine serves on: {error}")
        trace("executor_loop", "out_of_memory", where=where, tokens=tokens, requests=len(batch))
        for seq in batch.seqs:
            if not seq.request.ended:
                self._end(seq.request, "error", why)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _sample(self, batch: ScheduledBatch, logits: torch.Tensor) -> InFlight:
        rows = [i for i, s in enumerate(batch.seqs) if s.samples]
        requests = [batch.seqs[i].request for i in rows]
        pin = self.device.type == "cuda"
        if len(rows) != len(batch.seqs):
            index = torch.tensor(rows, dtype=torch.long, pin_memory=pin).to(logits.device, non_blocking=pin)
            logits = logits.index_select(0, index)
        # Structured output: the masks, built now that every token of these requests is on the host.
        tokens = self.sampler.sample(self.grammars.mask_logits(logits, requests), requests)
        prompt: PromptLogits | None = getattr(self.runner, "prompt_logits", None)  # this step's, set by forward
        plan = self.sampler.logprob_plan(requests, prompt)
        if plan is None:
            host = self._token_buffer(len(rows))
            host.copy_(tokens, non_blocking=pin)
        else:  # the ids and the log-probabilities (of the raw logits) in one copy
            packed = self.sampler.pack(plan, logits, tokens, prompt)
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=pin)
            host.copy_(packed, non_blocking=pin)
        event = self.new_event()
        has_first = any(not r.output_token_ids for r in requests)
        for req in requests:
            req.num_pending += 1
        self._log("sample_launch", rids=lambda: [r.request_id for r in requests])
        return InFlight(batch, requests, tokens, host, event, {r.request_id: i for i, r in enumerate(requests)},
                        has_first, plan)

    def _token_buffer(self, n: int) -> torch.Tensor:
        """A host buffer for a step's n sampled ids: on CUDA one of three preallocated pinned buffers in turn
        (a buffer is read by the update two iterations before its turn comes back: at most two steps are in
        flight), so no step allocates pinned memory."""
        if self.device.type != "cuda":
            return torch.empty(n, dtype=torch.long)
        if not self._token_ring or self._token_ring[0].shape[0] < n:
            size = max(n, self.scheduler.max_batch_size)
            self._token_ring = [torch.empty(size, dtype=torch.long, pin_memory=True) for _ in range(3)]
        self._ring_turn = (self._ring_turn + 1) % 3
        return self._token_ring[self._ring_turn][:n]

    def _new_event(self) -> torch.cuda.Event | None:
        """Marks the end of a step's host copy on the device's stream (None on CPU: the copy is synchronous)."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def _update(self, step: InFlight) -> None:
        """Moves the step's sampled tokens into their requests and applies the stop checks."""
        if step.event is not None:
            step.event.synchronize()
        first: list[int] = []
        entries: dict = {}
        if step.logprobs is None:
            tokens = step.host_tokens.tolist()
        else:
            tokens, entries, prompt = step.logprobs.unpack(step.host_tokens.tolist())
            for req, pos, entry in prompt:  # a position recomputed after a preemption keeps its first entry
                if not req.finished and req.prompt_logprobs is not None and req.prompt_logprobs[pos] is None:
                    req.prompt_logprobs[pos] = entry
        for row, (req, token) in enumerate(zip(step.requests, tokens, strict=True)):
            req.num_pending -= 1
            if req.finished:  # stopped (or aborted) before this step's token was known: drop it
                continue
            req.output_token_ids.append(token)
            if row in entries:
                req.output_logprobs.append(entries[row])
            if len(req.output_token_ids) == 1:
                req.prompt_scored = True  # the last prompt chunk's positions came with this token
                req.stamp("first_token_host")
                first.append(req.request_id)
            self._check_stop(req, token)
        self._log("update", first=first)

    def _check_stop(self, req: Request, token: int) -> None:
        p = req.params
        if p.structured is not None:  # the matcher takes the token; a complete grammar ends the request
            complete, error = self.grammars.advance(req)
            if error is not None:
                req.error = error
                self._finish(req, "error")
                return
            if complete:
                self._finish(req, "stop")
                return
        if (not p.ignore_eos and token in self.config.eos_token_ids) or token in p.stop_token_ids:
            self._finish(req, "stop")
        elif len(req.output_token_ids) >= p.max_tokens:
            self._finish(req, "length")

    @staticmethod
    def _finish(req: Request, reason: str) -> None:
        if not req.finished:
            req.finished = True
            req.finish_reason = reason

    # -- what to publish, publishing, freeing: three separate steps ------------------------------------

    def _collect(self, step: InFlight) -> None:
        """Queues the responses of a step that its early emission did not send."""
        self.deltas.extend(d for d in map(self._delta, step.requests) if d is not None)

    def _delta(self, req: Request) -> RequestDelta | None:
        """The publish rule, decided once per request and step: the first token, every ``stream_interval``
        new tokens, and the end (once). A request whose end is decided here is freed by ``_flush``."""
        if req.ended:
            return None
        new = req.output_token_ids[req.num_published :]
        if not req.finished:
            if not req.stream or not new:
                return None
            if req.num_published > 0 and len(new) < self.config.stream_interval:
                return None
        first = req.num_published == 0 and bool(new)
        delta = RequestDelta(req.request_id, new, req.finished, req.finish_reason if req.finished else None,
                             req.error)
        if req.params.logprobs is not None:
            delta.logprobs = req.output_logprobs[req.num_published : req.num_published + len(new)]
        if first and req.prompt_logprobs is not None:
            delta.prompt_logprobs, req.prompt_logprobs = req.prompt_logprobs, None  # the delta's alone from now
        req.num_published += len(new)
        delta.first = first
        if first or req.finished:
            delta.metrics = dict(req.metrics)
            delta.num_cached_tokens = req.num_cached_tokens
        if req.finished:
            req.ended = True
            self.ended.append(req)
        return delta

    def _end(self, req: Request, reason: str, error: str | None = None) -> None:
        """Decides a request's end (with ``error`` when it failed) and queues its unpublished tokens and reason;
        ``_free_ended`` frees it."""
        if error is not None:
            req.error = error
        self._finish(req, reason)
        delta = self._delta(req)
        if delta is not None:
            self.deltas.append(delta)

    def _end_now(self, req: Request, reason: str, error: str | None = None) -> None:
        """Ends a request between steps (abort, failure) and frees it at once, which is safe here: no batch
        that is not launched yet holds it."""
        self._end(req, reason, error)
        self._free_ended()

    def _free_ended(self) -> None:
        """Frees the requests whose end was decided, once no unlaunched step holds them. By identity: an id
        may already belong to a new request (reused after an abort)."""
        for req in self.ended:
            if self.requests.get(req.request_id) is req:
                del self.requests[req.request_id]
            self.scheduler.remove(req)
            if req.params.structured is not None:
                self.grammars.remove(req)
        self.ended.clear()

    def _flush(self) -> None:
        """The iteration's last publish point, after every launch: free what ended (so the stats that ride
        along say so), then publish."""
        self._free_ended()
        deltas, self.deltas = self.deltas, []
        self._publish(deltas, "final")

    def _publish(self, deltas: list[RequestDelta], point: str) -> None:
        """Every rank calls this at the same points; the first-token publish time is stamped here."""
        deltas = self.hooks.on_publish(self.iteration, point, deltas)
        now = time.time()
        for d in deltas:
            if d.first:
                d.metrics["first_token_published"] = now
        self.publish(deltas)

    def _log(self, event: str, **data: object) -> None:
        """An event for the debug log (values may be callables, evaluated only when the log is on)."""
        self.hooks.on_event(self.iteration, event, **data)

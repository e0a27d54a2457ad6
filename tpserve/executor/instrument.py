"""Debug instruments of the loop: a per-rank event log, and the cross-rank check of every publish.

``TPSERVE_EVENT_LOG=DIR`` writes ``DIR/events.rank<R>.jsonl``: one line per loop event, in order.
``TPSERVE_CHECK_RANKS=1`` gathers a digest of each publish (and each schedule) from every rank on rank 0,
which fails with the iteration, the ranks and what differed: a desync becomes an error, never a hang.
Test-only fault hooks, each ``RANK:ITERATION``: ``TPSERVE_FAULT_DIVERGE`` makes that rank publish a
bogus delta from that iteration on (the check must catch it); ``TPSERVE_FAULT_RAISE`` makes that rank's
loop raise there (the proxy must learn which rank failed). ``TPSERVE_FAULT_HOLD=RANK:PATH`` holds that rank's
loop at the start of every iteration while PATH exists (60 s at most), a wedge a test can start and end
(the other ranks wait in the next collective; ``tpserve stacks`` must name the held rank).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

if TYPE_CHECKING:
    from mpi4py import MPI


class RankDivergence(RuntimeError):
    pass


class EventLog:
    def __init__(self, directory: str, rank: int) -> None:
        os.makedirs(directory, exist_ok=True)
        self._f = open(os.path.join(directory, f"events.rank{rank}.jsonl"), "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def __call__(self, iteration: int, event: str, **data: Any) -> None:
        self._f.write(json.dumps({"it": iteration, "ev": event, "t": time.monotonic(), **data}) + "\n")

    def close(self) -> None:
        self._f.close()


class RankChecker:
    def __init__(self, comm: MPI.Comm) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.count = 0

    def __call__(self, what: str, iteration: int, payload: Any) -> None:
        """Collective on every rank, at the same points."""
        self.count += 1
        digest = hashlib.sha256(msgpack.packb(payload, use_bin_type=True)).hexdigest()[:16]
        gathered = self.comm.gather((digest, payload), root=0)
        if self.rank != 0:
            return
        bad = [r for r, (d, _) in enumerate(gathered) if d != gathered[0][0]]
        if bad:
            details = "; ".join(f"rank {r}: {gathered[r][1]!r}"[:300] for r in [0, *bad])
            raise RankDivergence(
                f"ranks diverged at iteration {iteration}, {what} #{self.count}: ranks {bad} differ from rank 0 ({details})"
            )


@dataclass(frozen=True)
class Faults:
    """The iterations from which this rank misbehaves on purpose (None: never)."""

    diverge_at: int | None = None
    raise_at: int | None = None
    hold_while: str | None = None  # a path: the loop holds while it exists


def _fault_iteration(name: str, rank: int) -> int | None:
    spec = os.environ.get(name)
    if not spec:
        return None
    fault_rank, iteration = (int(x) for x in spec.split(":"))
    return iteration if fault_rank == rank else None


class Instruments:
    """The loop's debug hooks in one object. This base class is what runs when every hook is off: each
    hook returns at once, so the loop pays one call per hook point and builds nothing for it."""

    def on_step(self, iteration: int) -> None:
        pass

    def on_event(self, iteration: int, event: str, **data: Any) -> None:
        pass

    def on_schedule(self, iteration: int, seqs: Any) -> None:
        pass

    def on_publish(self, iteration: int, point: str, deltas: list[Any]) -> list[Any]:
        return deltas

    def close(self) -> None:
        pass


class Debug(Instruments):
    """The hooks switched on by the environment: the event log, the cross-rank check, the fault hooks."""

    def __init__(self, events: EventLog | None, checker: RankChecker | None, faults: Faults) -> None:
        self.events = events
        self.checker = checker
        self.faults = faults

    def on_step(self, iteration: int) -> None:
        if self.faults.raise_at is not None and iteration >= self.faults.raise_at:
            raise RuntimeError(f"injected fault at iteration {iteration} (TPSERVE_FAULT_RAISE)")
        if self.faults.hold_while is not None:
            self._hold(self.faults.hold_while)

    @staticmethod
    def _hold(path: str) -> None:
        """Test-only wedge (TPSERVE_FAULT_HOLD): this rank's loop sleeps while ``path`` exists, bounded."""
        deadline = time.monotonic() + 60.0
        while os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)

    def on_event(self, iteration: int, event: str, **data: Any) -> None:
        if self.events is not None:
            self.events(iteration, event, **{k: v() if callable(v) else v for k, v in data.items()})

    def on_schedule(self, iteration: int, seqs: Any) -> None:
        summary = [[s.request.request_id, s.start_pos, s.num_tokens, s.samples] for s in seqs]
        self.on_event(iteration, "schedule", seqs=summary)
        if self.checker:
            self.checker("schedule", iteration, summary)

    def on_publish(self, iteration: int, point: str, deltas: list[Any]) -> list[Any]:
        if self.faults.diverge_at is not None and iteration >= self.faults.diverge_at:
            from tpserve.executor.request import RequestDelta

            deltas = [*deltas, RequestDelta(-1, [0])]  # test-only fault: this rank diverges
        summary = [[d.request_id, d.token_ids, d.finished, d.finish_reason] for d in deltas]
        self.on_event(iteration, "publish", point=point, deltas=summary,
                      first=[d.request_id for d in deltas if d.first])
        if self.checker:  # log-probabilities too: bit-identical on every rank, like the tokens
            checked = [[*s, d.logprobs, d.prompt_logprobs] for s, d in zip(summary, deltas, strict=True)]
            self.checker(f"{point} publish", iteration, checked)
        return deltas

    def close(self) -> None:
        if self.events is not None:
            self.events.close()


def make_instruments(comm: MPI.Comm) -> Instruments:
    """``Debug`` when the environment switches any hook on, else the do-nothing ``Instruments``."""
    rank = comm.Get_rank()
    log_dir = os.environ.get("TPSERVE_EVENT_LOG")
    events = EventLog(log_dir, rank) if log_dir else None
    checker = RankChecker(comm) if os.environ.get("TPSERVE_CHECK_RANKS") == "1" and comm.Get_size() > 1 else None
    hold = os.environ.get("TPSERVE_FAULT_HOLD", "")
    hold_rank, _, hold_path = hold.partition(":")
    faults = Faults(_fault_iteration("TPSERVE_FAULT_DIVERGE", rank), _fault_iteration("TPSERVE_FAULT_RAISE", rank),
                    hold_path if hold and int(hold_rank) == rank else None)
    if events is None and checker is None and faults == Faults():
        return Instruments()
    return Debug(events, checker, faults)

"""Rank 0's publish callback: every publish of the executor becomes one Outputs frame to the client, with
the engine's load riding along when it changed (so ``llm.stats()`` and the server's gauges need no round
trip). Other ranks make the same publishes (the symmetry rule) and send nothing."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from tpserve import wire

if TYPE_CHECKING:
    from tpserve.executor.executor import Executor
    from tpserve.executor.request import RequestDelta
    from tpserve.worker.rank0_io import Rank0IO

STATS_EVERY_S = 0.25  # at most this often while the load's shape stays the same


class Publisher:
    def __init__(self, io: Rank0IO | None) -> None:
        self.io = io
        self.executor: Executor | None = None  # set once the engine is built: its stats ride along
        self._last_key: tuple[Any, ...] | None = None
        self._last_sent = 0.0

    def __call__(self, deltas: list[RequestDelta]) -> None:
        if self.io is None:
            return
        # A first token leaves alone: the stats wait for the iteration's next publish (microseconds later),
        # so building and encoding them is not on a request's time to its first token.
        stats = None if any(d.first for d in deltas) else self._stats_to_send()
        if deltas or stats:
            self.io.send(wire.Outputs([d.to_dict() for d in deltas], stats))

    def _stats_to_send(self) -> dict[str, Any] | None:
        """The stats when running/waiting/shutting down/free blocks changed, or every 0.25 s; else None.
        Two publishes an iteration: the change is judged from four numbers, and the whole dict (a dozen
        reads and a dict, on the loop thread) is built only when it is sent."""
        ex = self.executor
        if ex is None:
            return None
        sched = ex.scheduler
        key = (len(sched.running), len(sched.waiting), ex.shutting_down, sched.blocks.num_free_blocks)
        now = time.monotonic()
        if key == self._last_key and now - self._last_sent < STATS_EVERY_S:
            return None
        self._last_key, self._last_sent = key, now
        return ex.stats()

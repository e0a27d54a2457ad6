"""Rank 0's publisher: what rides with a first token, and when the engine's load is built and sent."""

from types import SimpleNamespace

from tpserve import wire
from tpserve.executor.request import RequestDelta
from tpserve.worker.publisher import Publisher


class FakeIO:
    def __init__(self) -> None:
        self.sent: list[wire.Outputs] = []

    def send(self, msg: wire.Outputs) -> None:
        self.sent.append(msg)


class FakeExecutor:
    """The parts of the executor the publisher reads: the scheduler's queues, free blocks, ``stats()``."""

    def __init__(self) -> None:
        self.scheduler = SimpleNamespace(running=[], waiting=[], blocks=SimpleNamespace(num_free_blocks=10))
        self.shutting_down = False
        self.built = 0

    def stats(self) -> dict:
        self.built += 1
        return {"running": len(self.scheduler.running), "num_free_blocks": self.scheduler.blocks.num_free_blocks}


def test_a_first_token_leaves_without_stats_and_the_next_publish_brings_them():
    io, ex = FakeIO(), FakeExecutor()
    pub = Publisher(io)  # type: ignore[arg-type]
    pub.executor = ex  # type: ignore[assignment]
    ex.scheduler.running.append(object())
    first = RequestDelta(1, [5], first=True)
    pub([first])
    assert io.sent[-1].stats is None and ex.built == 0  # nothing built on the first token's way
    pub([])  # the iteration's final publish: the load changed, so it goes now, alone
    assert io.sent[-1].deltas == [] and io.sent[-1].stats == {"running": 1, "num_free_blocks": 10}
    assert ex.built == 1
    pub([RequestDelta(1, [6])])
    assert io.sent[-1].stats is None and ex.built == 1  # unchanged within 0.25 s: not even built
    ex.scheduler.blocks.num_free_blocks = 9
    pub([RequestDelta(1, [7])])
    assert io.sent[-1].stats == {"running": 1, "num_free_blocks": 9}

"""The per-iteration broadcast on real ranks: an idle rank sleeps even when a doorbell ring is stale.

Run with: mpiexec -n 2 python -m mpi4py -m pytest --with-mpi -p no:cacheprovider tests/mpi/test_request_queue.py
"""

import threading
import time
from collections import Counter

import pytest
from mpi4py import MPI

from tpserve import wire
from tpserve.executor.request_queue import RequestQueue

IDLE_S = 1.0


@pytest.mark.mpi(min_size=2)
def test_stale_ring_does_not_make_an_idle_rank_spin():
    """A ring can outlive its broadcast (the broadcast completes before the ring is polled); the next idle
    fetch then sees it at once. It must go back to sleep, not busy-wait in MPI until rank 0 broadcasts."""
    comm = MPI.COMM_WORLD
    q = RequestQueue(comm)
    try:
        if comm.Get_rank() == 0:
            q._bell.send(b"")  # the stale ring
        time.sleep(0.2)  # it reaches every other rank before the idle fetch below
        comm.Barrier()
        if comm.Get_rank() == 0:
            threading.Timer(IDLE_S, q.put, args=(wire.Abort(request_id=7),)).start()
        cpu, wall = time.process_time(), time.monotonic()
        items = q.fetch(idle=True)
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        assert [type(i) for i in items] == [wire.Abort] and items[0].request_id == 7
        used = comm.allgather(cpu)
        # a share of the wall time it idled (a late timer on a loaded machine idles longer, and uses no more)
        assert all(u < 0.3 * wall for u in used), f"CPU seconds per rank while idle for {wall:.2f} s: {used}"
        # The queue keeps working after it: a busy fetch (no doorbell) and one more idle one.
        if comm.Get_rank() == 0:
            q.put(wire.Abort(request_id=8))
        assert [i.request_id for i in q.fetch(idle=False)] == [8]
        if comm.Get_rank() == 0:
            threading.Timer(0.1, q.put, args=(wire.Abort(request_id=9),)).start()
        assert [i.request_id for i in q.fetch(idle=True)] == [9]
    finally:
        comm.Barrier()
        q.close()


class CountingComm:
    """The world communicator, counting the collectives that the queue calls on it."""

    COLLECTIVES = ("Bcast", "Ibcast", "bcast", "allgather", "Ibarrier", "Barrier")

    def __init__(self, comm):
        self.comm = comm
        self.calls = Counter()

    def __getattr__(self, name):
        attr = getattr(self.comm, name)
        if name not in self.COLLECTIVES:
            return attr

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return attr(*args, **kwargs)
        return counted


@pytest.mark.mpi(min_size=2)
def test_one_broadcast_per_iteration_unless_the_items_are_large():
    comm = CountingComm(MPI.COMM_WORLD)
    q = RequestQueue(comm)
    try:
        rank0 = comm.comm.Get_rank() == 0
        prompts = {"small": list(range(50)), "large": list(range(5000))}  # the large one does not fit inline
        for name, expected in (("nothing", 1), ("small", 1), ("large", 2)):
            comm.calls.clear()
            if rank0 and name != "nothing":
                q.put(wire.Submit(request_id=3, prompt_token_ids=prompts[name], params={}))
            items = q.fetch(idle=False)
            assert sum(comm.calls.values()) == expected, (name, comm.calls)
            if name == "nothing":
                assert items == []
            else:
                assert len(items) == 1 and items[0].prompt_token_ids == prompts[name]
        comm.calls.clear()
        if rank0:
            threading.Timer(0.1, q.put, args=(wire.Abort(request_id=4),)).start()
        assert [i.request_id for i in q.fetch(idle=True)] == [4]
        assert sum(comm.calls.values()) == 1, comm.calls
    finally:
        comm.comm.Barrier()
        q.close()

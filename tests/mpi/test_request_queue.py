"""The per-iteration broadcast on real ranks: an idle rank sleeps even when a doorbell ring is stale.

Run with: mpiexec -n 2 python -m mpi4py -m pytest --with-mpi -p no:cacheprovider tests/mpi/test_request_queue.py
"""

import threading
import time

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
        cpu = time.process_time()
        items = q.fetch(idle=True)
        cpu = time.process_time() - cpu
        assert [type(i) for i in items] == [wire.Abort] and items[0].request_id == 7
        used = comm.allgather(cpu)
        assert all(u < 0.3 * IDLE_S for u in used), f"CPU seconds per rank while idle for {IDLE_S} s: {used}"
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

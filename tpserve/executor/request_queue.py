"""Rank 0's intake queue and the per-iteration broadcast that gives every rank the same new items."""

from __future__ import annotations

import queue
import socket
import time

import numpy as np
import zmq
from mpi4py import MPI

from tpserve import hop_trace, wire

DOORBELL_FALLBACK_MS = 50  # an idle rank re-checks the broadcast this often even if a doorbell is lost
DOORBELL_SETUP_S = 5.0
INLINE_BYTES = 4088  # payload bytes that ride in the one broadcast of an iteration (a 4 KiB header)
RING_SPIN_S = 0.002  # after a ring, busy-test this long before sleeping again (the ring may be stale)


class RequestQueue:
    """Items (submit, abort, shutdown) arrive on rank 0 from its intake thread; ``fetch`` hands the
    same list to every rank once per iteration, with the same number of collectives on every rank.

    Idle costs nothing: Open MPI's blocking collectives busy-poll, so while no request is in flight the
    other ranks post a non-blocking broadcast and sleep in ``poll()`` on a ZeroMQ doorbell that rank 0
    rings just before it broadcasts, waking within microseconds (a lost ring costs at most 50 ms)."""

    def __init__(self, comm: MPI.Comm) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self._queue: queue.Queue[wire.Message] = queue.Queue()
        self._header = np.zeros(8 + INLINE_BYTES, dtype=np.uint8)  # payload length, then the payload's head
        self._ctx: zmq.Context | None = None
        self._bell: zmq.Socket | None = None
        if comm.Get_size() > 1:
            self._open_doorbell()

    def _open_doorbell(self) -> None:
        hosts = self.comm.allgather(socket.gethostname())
        self._ctx = zmq.Context(io_threads=1)
        endpoint = None
        if self.rank == 0:
            self._bell = self._ctx.socket(zmq.PUB)
            host = "127.0.0.1" if len(set(hosts)) == 1 else "0.0.0.0"
            self._bell.bind(f"tcp://{host}:*")
            endpoint = self._bell.getsockopt_string(zmq.LAST_ENDPOINT)
            if host == "0.0.0.0":
                endpoint = endpoint.replace("0.0.0.0", socket.gethostbyname(socket.gethostname()))
        endpoint = self.comm.bcast(endpoint, root=0)
        if self.rank != 0:
            self._bell = self._ctx.socket(zmq.SUB)
            self._bell.setsockopt(zmq.SUBSCRIBE, b"")
            self._bell.connect(endpoint)
        self._bell.setsockopt(zmq.LINGER, 0)
        # PUB/SUB joins asynchronously: ring until every rank has heard one ring (bounded).
        deadline = time.monotonic() + DOORBELL_SETUP_S
        if self.rank == 0:
            barrier = self.comm.Ibarrier()
            while not barrier.Test() and time.monotonic() < deadline:
                self._bell.send(b"")
                time.sleep(0.005)
            barrier.Wait()
        else:
            self._bell.poll(int(DOORBELL_SETUP_S * 1000))
            self.comm.Ibarrier().Wait()  # the same (non-blocking) form as rank 0's, or they do not match
            self._drain_bell()

    def _drain_bell(self) -> None:
        while self._bell.poll(0):
            self._bell.recv()

    def close(self) -> None:
        if self._bell is not None:
            self._bell.close(linger=0)
            self._ctx.term()
            self._bell = None

    def put(self, item: wire.Message) -> None:
        """Rank 0 only (intake thread)."""
        self._queue.put(item)

    def _drain(self, block: bool) -> list[wire.Message]:
        items: list[wire.Message] = []
        if block:
            while True:  # idle: sleep in the kernel until something arrives, re-checking each second
                try:
                    items.append(self._queue.get(timeout=1.0))
                    break
                except queue.Empty:
                    continue
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def _sleep_until(self, req: MPI.Request) -> None:
        """Sleeps on the doorbell until ``req`` completes. A ring is followed by the broadcast within
        microseconds, so spin briefly after one; but a ring can also be stale (its broadcast completed
        before it was polled), so never spin for long: go back to sleep."""
        while not req.Test():
            if self._bell.poll(DOORBELL_FALLBACK_MS):
                self._drain_bell()
                spin_until = time.perf_counter() + RING_SPIN_S
                while time.perf_counter() < spin_until:
                    if req.Test():
                        return

    @staticmethod
    def _taken(items: list[wire.Message]) -> list[wire.Message]:
        """Rank 0's items as the loop takes them (stamped for ``hop_trace`` when it is on)."""
        if hop_trace.ENABLED:
            for item in items:
                if isinstance(item, wire.Submit):
                    hop_trace.stamp(item.request_id, "r_fetched")
        return items

    def fetch(self, idle: bool) -> list[wire.Message]:
        """Collective: returns the new items on every rank. ``idle`` (the same on every rank) makes rank 0
        block for the next item and the others sleep until it rings.

        One broadcast per iteration: a fixed-size header carries the payload's length and, when it fits,
        the payload itself (a steady decode step brings nothing new, most arrivals are small); only a
        larger payload costs a second broadcast of the rest. The intake's messages are already checked and
        rebuilt, so no rank 0 packs them for itself: at TP 1 nothing is packed, and at TP > 1 rank 0 keeps
        its own list while the others unpack its copy (equal values, so every rank admits the same)."""
        if self.comm.Get_size() == 1:
            return self._taken(self._drain(block=idle))  # the intake's checked messages as they are
        header = self._header
        if self.rank == 0:
            items = self._drain(block=idle)
            payload = wire.pack_items(items)
            inline = min(len(payload), INLINE_BYTES)
            header[:8] = np.frombuffer(len(payload).to_bytes(8, "little"), dtype=np.uint8)
            header[8:8 + inline] = np.frombuffer(payload, dtype=np.uint8, count=inline)
        if idle:  # every rank posts the non-blocking form: the two forms never match each other
            req = self.comm.Ibcast(header, root=0)
            if self.rank == 0:
                self._bell.send(b"")
                req.Wait()
            else:
                self._sleep_until(req)
        else:
            self.comm.Bcast(header, root=0)
        n = int.from_bytes(header[:8].tobytes(), "little")
        if self.rank == 0:  # its own items: what the others unpack is equal to them (rebuilt, checked values)
            if n > INLINE_BYTES:
                self.comm.Bcast([bytearray(payload[INLINE_BYTES:]), MPI.BYTE], root=0)
            return self._taken(items)
        head = header[8:8 + min(n, INLINE_BYTES)].tobytes()
        if n <= INLINE_BYTES:
            return wire.unpack_items(head)
        rest = bytearray(n - INLINE_BYTES)
        self.comm.Bcast([rest, MPI.BYTE], root=0)
        return wire.unpack_items(head + bytes(rest))

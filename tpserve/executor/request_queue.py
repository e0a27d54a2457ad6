"""Rank 0's intake queue and the per-iteration broadcast that gives every rank the same new items."""

from __future__ import annotations

import queue
import time

import numpy as np
from mpi4py import MPI

from tpserve import wire

IDLE_POLL_S = 0.0005


class RequestQueue:
    """Items (submit, abort, shutdown) arrive on rank 0 from its intake thread; ``fetch`` hands the
    same list to every rank once per iteration, with the same number of collectives on every rank."""

    def __init__(self, comm: MPI.Comm) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self._queue: queue.Queue[wire.Message] = queue.Queue()
        self._length = np.zeros(1, dtype=np.int64)

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

    def fetch(self, idle: bool) -> list[wire.Message]:
        """Collective: returns the new items on every rank. ``idle`` (the same on every rank) makes rank 0
        block for the next item and the others wait without spinning."""
        if self.rank == 0:
            payload = wire.pack_items(self._drain(block=idle))
            self._length[0] = len(payload)
        if idle and self.comm.Get_size() > 1:
            # Open MPI's blocking collectives busy-poll; poll a non-blocking one with sleeps instead.
            req = self.comm.Ibcast(self._length, root=0)
            while not req.Test():
                time.sleep(IDLE_POLL_S)
        else:
            self.comm.Bcast(self._length, root=0)
        n = int(self._length[0])
        buf = bytearray(payload) if self.rank == 0 else bytearray(n)
        if self.comm.Get_size() > 1:
            self.comm.Bcast([buf, MPI.BYTE], root=0)
        return wire.unpack_items(bytes(buf))

"""Timestamps of a request's hand-offs between threads and processes, for ``scripts/hop_profile.py``.

Off unless ``TPSERVE_HOP_TRACE=DIR`` is set (then a ``stamp`` is one list append, off it is one test of a
module constant). Every stamp is ``time.time()``, the clock of the request's metrics, the same in every
process of a host. Rank 0 writes its stamps to ``DIR/hops.rank0.<pid>.json`` when its sockets close; the
proxy's stay in this module's ``STAMPS`` for the profile to read in-process.
"""

from __future__ import annotations

import json
import os
import time

DIR = os.environ.get("TPSERVE_HOP_TRACE") or None
ENABLED = DIR is not None
STAMPS: list[tuple[int, str, float]] = []  # (request id, hop, time.time())


def stamp(request_id: int, hop: str, t: float | None = None) -> None:
    """Records when ``request_id`` passed ``hop`` (now, or at ``t``). Callers test ``ENABLED`` first."""
    STAMPS.append((request_id, hop, time.time() if t is None else t))


def dump(tag: str) -> None:
    """Writes this process's stamps to ``DIR/hops.<tag>.<pid>.json`` (nothing when off)."""
    if DIR is None:
        return
    os.makedirs(DIR, exist_ok=True)
    with open(os.path.join(DIR, f"hops.{tag}.{os.getpid()}.json"), "w", encoding="utf-8") as f:
        json.dump(STAMPS, f)

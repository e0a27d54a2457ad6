"""The protocol between the proxy and rank 0, in one place: message types and their encoding.

Every ZeroMQ message is two frames: an HMAC-SHA256 tag of the payload under the per-launch key, and
the msgpack payload ``[kind, fields]``. No pickle anywhere. A frame that fails the tag check or does
not decode is dropped and counted by the ``Codec``; it never raises into a socket thread.
The MPI broadcast between ranks reuses the same msgpack encoding (without the tag: MPI is trusted).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import msgpack


@dataclass
class Message:
    KIND: ClassVar[str] = ""


@dataclass
class Hello(Message):
    """Proxy -> rank 0: asks for READY once the workers are up (answered even if already sent)."""

    KIND: ClassVar[str] = "hello"
    proxy_pid: int = 0


@dataclass
class Ready(Message):
    """Rank 0 -> proxy: the engine is loaded and serving."""

    KIND: ClassVar[str] = "ready"
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class StartupError(Message):
    """Rank 0 -> proxy: a rank failed while starting; ``LLM(...)`` raises this."""

    KIND: ClassVar[str] = "startup_error"
    message: str = ""
    traceback: str = ""
    rank: int = 0


@dataclass
class Submit(Message):
    """A new request. Also the item broadcast to every rank."""

    KIND: ClassVar[str] = "submit"
    request_id: int = 0
    prompt_token_ids: list[int] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    arrival_time: float = 0.0  # proxy's clock
    rank0_time: float = 0.0  # rank 0's intake clock


@dataclass
class Abort(Message):
    KIND: ClassVar[str] = "abort"
    request_id: int = 0


@dataclass
class Shutdown(Message):
    """The sentinel: proxy -> rank 0 -> every rank. ``drain`` lets active requests finish first."""

    KIND: ClassVar[str] = "shutdown"
    drain: bool = False


@dataclass
class Heartbeat(Message):
    """Proxy -> rank 0 once a second, so workers notice a proxy that died without a word."""

    KIND: ClassVar[str] = "heartbeat"
    time: float = 0.0


@dataclass
class Outputs(Message):
    """Rank 0 -> proxy: one publish of the executor, a list of ``RequestDelta`` dicts."""

    KIND: ClassVar[str] = "outputs"
    deltas: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] | None = None  # the executor's load, sent when it changes (at most 4 per second)


@dataclass
class EngineDead(Message):
    """Rank 0 -> proxy: the executor failed on some rank; every pending request fails with it."""

    KIND: ClassVar[str] = "engine_dead"
    message: str = ""
    rank: int = 0


@dataclass
class Goodbye(Message):
    """Rank 0 -> proxy: the workers are shutting down; the proxy's threads may quit."""

    KIND: ClassVar[str] = "goodbye"
    reason: str = ""


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.KIND: cls
    for cls in (Hello, Ready, StartupError, Submit, Abort, Shutdown, Heartbeat, Outputs, EngineDead, Goodbye)
}


def pack(msg: Message) -> bytes:
    return msgpack.packb([msg.KIND, asdict(msg)], use_bin_type=True)


def _build(pair: Any) -> Message:
    kind, body = pair
    cls = MESSAGE_TYPES[kind]
    if not isinstance(body, dict) or not set(body) <= {f.name for f in fields(cls)}:
        raise ValueError(f"unexpected fields for {kind!r}")
    return cls(**body)


def unpack(payload: bytes) -> Message:
    """Decodes one payload; raises ``ValueError`` on anything that is not a known message."""
    try:
        return _build(msgpack.unpackb(payload, raw=False))
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as e:
        raise ValueError(f"undecodable message: {e}") from e


def pack_items(items: list[Message]) -> bytes:
    return msgpack.packb([[m.KIND, asdict(m)] for m in items], use_bin_type=True)


def unpack_items(payload: bytes) -> list[Message]:
    return [_build(pair) for pair in msgpack.unpackb(payload, raw=False)]


def new_key() -> bytes:
    return secrets.token_bytes(32)


class Codec:
    """Signs and checks frames under one key; counts what it drops instead of raising."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("HMAC key must be at least 16 bytes")
        self._key = key
        self._lock = threading.Lock()
        self.dropped = 0

    def _tag(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def encode(self, msg: Message) -> list[bytes]:
        payload = pack(msg)
        return [self._tag(payload), payload]

    def decode(self, frames: list[bytes]) -> Message | None:
        """Returns the message, or None (counted in ``dropped``) for a bad tag or payload."""
        if len(frames) == 2 and hmac.compare_digest(self._tag(frames[1]), frames[0]):
            try:
                return unpack(frames[1])
            except ValueError:
                pass
        with self._lock:
            self.dropped += 1
        return None


# -- connection info: how the proxy finds the workers -----------------------------------------------

ENV_KEY = "TPSERVE_HMAC_KEY"
ENV_REQUEST_ADDR = "TPSERVE_REQUEST_ADDR"
ENV_RESPONSE_ADDR = "TPSERVE_RESPONSE_ADDR"


@dataclass
class ConnectionInfo:
    """The two ZeroMQ addresses (requests to rank 0, responses from it) and the HMAC key."""

    request_addr: str
    response_addr: str
    key: bytes

    def write(self, path: str) -> None:
        """Writes a connection file readable by its owner only (mode 0600), atomically."""
        body = json.dumps(
            {"request_addr": self.request_addr, "response_addr": self.response_addr, "key": self.key.hex(),
             "pid": os.getpid()}
        ).encode()
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, body)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: str) -> ConnectionInfo:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        try:
            return cls(d["request_addr"], d["response_addr"], bytes.fromhex(d["key"]))
        except (KeyError, ValueError) as e:
            raise ValueError(f"connection file {path} is malformed: {e}") from e


HEARTBEAT_S = 1.0  # both ends send one this often, so either can tell silence from death


def open_sockets(conn: ConnectionInfo, bind: bool, proxy_side: bool, send_timeout_ms: int):
    """The two PUSH/PULL sockets of one end: the proxy pushes requests and pulls responses, rank 0 the
    reverse. The binding end learns its real endpoints (``tcp://host:*`` picks free ports).
    Returns (context, push, pull, the connection info with resolved addresses)."""
    import zmq

    ctx = zmq.Context(io_threads=1)
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    for sock in (push, pull):
        sock.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
    push_addr, pull_addr = (
        (conn.request_addr, conn.response_addr) if proxy_side else (conn.response_addr, conn.request_addr)
    )
    if not bind:
        push.connect(push_addr)
        pull.connect(pull_addr)
        return ctx, push, pull, conn
    push.bind(push_addr)
    pull.bind(pull_addr)
    push_end, pull_end = push.getsockopt_string(zmq.LAST_ENDPOINT), pull.getsockopt_string(zmq.LAST_ENDPOINT)
    request, response = (push_end, pull_end) if proxy_side else (pull_end, push_end)
    return ctx, push, pull, ConnectionInfo(request, response, conn.key)

"""The protocol between the proxy and rank 0, in one place: message types, their schemas and encoding.

Every ZeroMQ message is two frames: an HMAC-SHA256 tag of the payload under the per-launch key, and
the msgpack payload ``[session, engine, seq, kind, fields]``. No pickle anywhere.
- ``session`` is the client's random nonce: one session per attached proxy (its Hello opens it), and the
  routing id of the proxy's response socket, so rank 0's frames reach that proxy and no other.
- ``engine`` is rank 0's random nonce on rank 0's frames (empty on the proxy's).
- ``seq`` counts a session's frames in each direction from 1: the receiver takes only numbers above the
  last it took, so a replayed frame is dropped, and a gap is seen.
A frame that fails the tag check or does not decode is dropped and counted by the ``Codec``; one that
decodes but breaks its kind's schema comes back as a ``Frame`` without a message, with the reason and
its request id when it has a usable one. Decoding never raises into a socket thread.
Decoding is in two steps, so that a receiver's work per frame is bounded: the envelope first (each element's
type checked from its first byte before it is read), so a frame of another session is dropped with its
body unread; then the body, with msgpack's bounds on the lengths that its kind allows (``BodyLimits``).
The MPI broadcast between ranks reuses the msgpack encoding (without tag or envelope: MPI is trusted).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import math
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import msgpack


@dataclass
class Message:
    KIND: ClassVar[str] = ""


@dataclass
class Hello(Message):
    """Proxy -> rank 0: opens the proxy's session and asks for READY (answered every time it is sent)."""

    KIND: ClassVar[str] = "hello"
    proxy_pid: int = 0


@dataclass
class Ready(Message):
    """Rank 0 -> proxy: the engine is loaded and serving."""

    KIND: ClassVar[str] = "ready"
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Refused(Message):
    """Rank 0 -> a proxy whose Hello came while another proxy's session is live: one client at a time."""

    KIND: ClassVar[str] = "refused"
    reason: str = ""


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
    """Both ways once a second, so either end notices the other going silent."""

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


def error_delta(request_id: int, why: str) -> dict[str, Any]:
    """The delta that ends one request with an error, in the executor's ``RequestDelta`` form."""
    return {"request_id": request_id, "token_ids": [], "finished": True, "finish_reason": "error", "error": why,
            "metrics": {}, "num_cached_tokens": None, "logprobs": None, "prompt_logprobs": None}


# -- schemas: every field of every kind is checked, and messages are rebuilt from checked values only -----

INT64 = 2**63
TOKEN_ID_LIMIT = 2**31
PLAIN_DEPTH = 6  # free-form dicts (Ready.info, Outputs.stats, delta metrics): deeper is refused unvisited


def _show(v: Any) -> str:
    """A short description of a bad value (never ``repr`` of a container: it may be nested 1,000 deep)."""
    if isinstance(v, (list, tuple, dict)):
        return f"a {type(v).__name__} of {len(v)}"
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _int64(v: Any) -> int:
    if type(v) is not int or not -INT64 <= v < INT64:
        raise ValueError(f"{_show(v)} is not an integer within int64")
    return v


def _count(v: Any) -> int:
    if type(v) is not int or not 0 <= v < INT64:
        raise ValueError(f"{_show(v)} is not a non-negative integer within int64")
    return v


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise ValueError(f"{_show(v)} is not a bool")
    return v


def _str(v: Any) -> str:
    if type(v) is not str:
        raise ValueError(f"{_show(v)} is not a string")
    return v


def _opt_str(v: Any) -> str | None:
    return None if v is None else _str(v)


def _time(v: Any) -> float:
    if type(v) is not float or not math.isfinite(v):
        raise ValueError(f"{_show(v)} is not a finite float")
    return v


def _token_ids(v: Any) -> list[int]:
    if type(v) is not list:
        raise ValueError(f"{_show(v)} is not a list of token ids")
    for i, t in enumerate(v):
        if type(t) is not int:
            raise ValueError(f"token id {_show(t)} at position {i} is not an integer")
        if not 0 <= t < TOKEN_ID_LIMIT:  # no vocabulary is that large: the executor checks the real size
            raise ValueError(f"token id {t} at position {i} is outside the vocabulary (beyond [0, 2**31))")
    return list(v)


def _plain(v: Any, depth: int) -> Any:
    """A copy of msgpack-native data, at most ``depth`` containers deep, with string keys."""
    if v is None or type(v) in (bool, int, float, str, bytes):
        return v
    if depth <= 0:
        raise ValueError(f"nested deeper than {PLAIN_DEPTH} levels")
    if type(v) is list:
        return [_plain(x, depth - 1) for x in v]
    if type(v) is dict:
        if not all(type(k) is str for k in v):
            raise ValueError("has a key that is not a string")
        return {k: _plain(x, depth - 1) for k, x in v.items()}
    raise ValueError(f"{_show(v)} is not plain data")


def _plain_dict(v: Any) -> dict[str, Any]:
    if type(v) is not dict:
        raise ValueError(f"{_show(v)} is not a dict")
    return _plain(v, PLAIN_DEPTH)


def _opt_plain_dict(v: Any) -> dict[str, Any] | None:
    return None if v is None else _plain_dict(v)


def _params(v: Any) -> dict[str, Any]:
    """Sampling parameters: a dict of scalars and flat lists (``SamplingParams`` checks the values)."""
    if type(v) is not dict:
        raise ValueError(f"{_show(v)} is not a dict")
    return _plain(v, 2)


def _opt_count(v: Any) -> int | None:
    return None if v is None else _count(v)


DELTA_FIELDS: dict[str, Callable[[Any], Any]] = {
    "request_id": _int64, "token_ids": _token_ids, "finished": _bool, "finish_reason": _opt_str,
    "error": _opt_str, "metrics": _plain_dict, "num_cached_tokens": _opt_count,
}


MAX_LOGPROB_ENTRY = 21  # the chosen token and up to 20 most likely (SamplingParams.MAX_LOGPROBS)


def _logprob_entry(v: Any) -> list[list[Any]]:
    """[[token_id, logprob, rank], ...]: the chosen token first, then the top k."""
    if type(v) is not list or not 1 <= len(v) <= MAX_LOGPROB_ENTRY:
        raise ValueError(f"log-probability entry {_show(v)} is not a list of 1 to {MAX_LOGPROB_ENTRY}")
    out = []
    for item in v:
        if type(item) is not list or len(item) != 3:
            raise ValueError(f"log-probability {_show(item)} is not [token_id, logprob, rank]")
        token, logprob, rank = item
        if type(token) is not int or not 0 <= token < TOKEN_ID_LIMIT or type(rank) is not int or rank < 1:
            raise ValueError(f"log-probability {_show(item)} has a bad token id or rank")
        if type(logprob) is not float or math.isnan(logprob) or logprob > 0.0:
            raise ValueError(f"log-probability {_show(logprob)} is not a float <= 0")
        out.append([token, logprob, rank])
    return out


def _opt_logprobs(v: Any) -> list[Any] | None:
    """None, or one entry (or None: a prompt's first token) per position."""
    if v is None:
        return None
    if type(v) is not list:
        raise ValueError(f"{_show(v)} is not a list of log-probability entries")
    return [None if e is None else _logprob_entry(e) for e in v]


OPTIONAL_DELTA_FIELDS: dict[str, Callable[[Any], Any]] = {
    "logprobs": _opt_logprobs, "prompt_logprobs": _opt_logprobs,
}


def _deltas(v: Any) -> list[dict[str, Any]]:
    if type(v) is not list:
        raise ValueError(f"{_show(v)} is not a list of deltas")
    out = []
    for d in v:
        if type(d) is not dict:
            raise ValueError(f"delta {_show(d)} is not a dict")
        missing = DELTA_FIELDS.keys() - d.keys()
        if missing:
            raise ValueError(f"delta lacks {sorted(missing)}")
        try:
            checked = {name: check(d[name]) for name, check in DELTA_FIELDS.items()}
            checked |= {name: check(d.get(name)) for name, check in OPTIONAL_DELTA_FIELDS.items()}
            out.append(checked)
        except ValueError as e:
            raise ValueError(f"delta of request {_show(d['request_id'])}: {e}") from None
    return out


SCHEMAS: dict[str, dict[str, Callable[[Any], Any]]] = {
    Hello.KIND: {"proxy_pid": _count},
    Ready.KIND: {"info": _plain_dict},
    Refused.KIND: {"reason": _str},
    StartupError.KIND: {"message": _str, "traceback": _str, "rank": _count},
    Submit.KIND: {"request_id": _int64, "prompt_token_ids": _token_ids, "params": _params, "stream": _bool,
                  "arrival_time": _time, "rank0_time": _time},
    Abort.KIND: {"request_id": _int64},
    Shutdown.KIND: {"drain": _bool},
    Heartbeat.KIND: {"time": _time},
    Outputs.KIND: {"deltas": _deltas, "stats": _opt_plain_dict},
    EngineDead.KIND: {"message": _str, "rank": _count},
    Goodbye.KIND: {"reason": _str},
}
MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.KIND: cls
    for cls in (Hello, Ready, Refused, StartupError, Submit, Abort, Shutdown, Heartbeat, Outputs, EngineDead, Goodbye)
}
assert all(set(SCHEMAS[k]) == {f.name for f in fields(c)} for k, c in MESSAGE_TYPES.items())


class Invalid(ValueError):
    """A message that breaks its kind's schema; ``request_id`` when it carries a usable one."""

    def __init__(self, why: str, request_id: int | None = None) -> None:
        super().__init__(why)
        self.request_id = request_id


def build(kind: Any, body: Any) -> Message:
    """The message of ``kind`` rebuilt from the checked values of ``body`` only; raises ``Invalid``."""
    if type(kind) is not str or kind not in SCHEMAS:
        raise Invalid(f"unknown message kind {_show(kind)}")
    if type(body) is not dict:
        raise Invalid(f"{kind}: fields are {_show(body)}, not a dict")
    rid = body.get("request_id")
    rid = rid if type(rid) is int and -INT64 <= rid < INT64 else None
    schema = SCHEMAS[kind]
    unknown = [k for k in body if k not in schema]
    if unknown:
        raise Invalid(f"{kind}: unknown field {_show(unknown[0])}", rid)
    values = {}
    for name, check in schema.items():
        if name not in body:
            raise Invalid(f"{kind}: missing field {name!r}", rid)
        try:
            values[name] = check(body[name])
        except ValueError as e:
            raise Invalid(f"{kind}.{name}: {e}", rid) from None
    return MESSAGE_TYPES[kind](**values)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _fields(msg: Message) -> dict[str, Any]:
    """Shallow (checked values need no copy); the names once per class (``dataclasses.fields`` is 2x this)."""
    names = _FIELD_NAMES.get(type(msg))
    if names is None:
        names = _FIELD_NAMES[type(msg)] = tuple(f.name for f in fields(msg))
    return {name: getattr(msg, name) for name in names}


def _unpackb(payload: bytes) -> Any:
    """msgpack decoding that only raises ``ValueError`` (nesting past msgpack's stack limit included)."""
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)  # keys are checked by the schemas
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as e:
        raise ValueError(f"undecodable: {type(e).__name__}: {e}") from None


def pack(msg: Message) -> bytes:
    return msgpack.packb([msg.KIND, _fields(msg)], use_bin_type=True)


def unpack(payload: bytes) -> Message:
    """Decodes one un-enveloped payload; raises ``ValueError`` on anything that is not a sound message."""
    pair = _unpackb(payload)
    if type(pair) is not list or len(pair) != 2:
        raise ValueError("not a [kind, fields] pair")
    return build(*pair)


def pack_items(items: list[Message]) -> bytes:
    return msgpack.packb([[m.KIND, _fields(m)] for m in items], use_bin_type=True)


def unpack_items(payload: bytes) -> list[Message]:
    return [build(*pair) for pair in _unpackb(payload)]


def new_key() -> bytes:
    return secrets.token_bytes(32)


NONCE_BYTES = 16


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


@dataclass
class Frame:
    """One signed, decoded frame: its envelope, and its message or why the message was refused."""

    session: bytes
    engine: bytes
    seq: int
    msg: Message | None
    error: str = ""
    request_id: int | None = None  # of a refused message, when it has a usable one


@dataclass
class Envelope:
    """A signed frame whose envelope is read and whose body is not yet: ``Codec.body`` decodes it."""

    session: bytes
    engine: bytes
    seq: int
    kind: str | None  # None: not a short string (the body's check refuses it)
    payload: bytes
    offset: int  # where the body starts in ``payload``


@dataclass(frozen=True)
class BodyLimits:
    """The most a body may hold, per msgpack object: longer arrays, maps, strings or bytes are refused by
    the decoder before anything is built. ``array`` bounds a Submit's token ids (the engine's max_seq_len)."""

    array: int = 1 << 24
    map: int = 1 << 16
    str: int = 1 << 24
    bin: int = 1 << 24
    intake: bool = False  # rank 0's: only a Submit may be large; every other kind a proxy sends is small

    def for_kind(self, kind: str | None) -> dict[str, int]:
        """msgpack's bounds for a body of ``kind``, and ``containers``: the most lists and maps it may hold
        (so nesting cannot multiply the work; generous enough that a hostile field 1,000 deep is still
        refused by its schema, by name)."""
        small = {"max_array_len": 8, "max_map_len": 8, "max_str_len": 64, "max_bin_len": 64, "max_ext_len": 0,
                 "containers": 2048}
        if kind == Submit.KIND:  # token ids, sampling params (a few dozen keys, short lists and strings)
            return {"max_array_len": max(self.array, 1 << 16), "max_map_len": 64, "max_str_len": 1 << 12,
                    "max_bin_len": 1 << 12, "max_ext_len": 0, "containers": 4096}
        if self.intake or kind not in SCHEMAS or kind in (Hello.KIND, Abort.KIND, Shutdown.KIND, Heartbeat.KIND):
            return small
        return {"max_array_len": self.array, "max_map_len": self.map, "max_str_len": self.str,
                "max_bin_len": self.bin, "max_ext_len": 0}


# First bytes of msgpack's types, to check an envelope element's type before reading it.
_BIN = {0xC4, 0xC5, 0xC6}
_STR = {*range(0xA0, 0xC0), 0xD9, 0xDA, 0xDB}
_UINT = {*range(0x00, 0x80), 0xCC, 0xCD, 0xCE, 0xCF}


def _header_len(payload: bytes, pos: int) -> int | None:
    """The length in a str or bin header at ``pos`` (None: neither, or cut short)."""
    b = payload[pos] if pos < len(payload) else -1
    if 0xA0 <= b <= 0xBF:
        return b & 0x1F
    size = {0xC4: 1, 0xD9: 1, 0xC5: 2, 0xDA: 2, 0xC6: 4, 0xDB: 4}.get(b)
    if size is None or pos + 1 + size > len(payload):
        return None
    return int.from_bytes(payload[pos + 1 : pos + 1 + size], "big")


def _read_envelope(payload: bytes) -> tuple[bytes, bytes, int, str | None, int] | None:
    """(session, engine, seq, kind, body offset), reading nothing but the envelope; None if it is unsound.
    A kind that is not a short string is skipped unbuilt and given as None (the body's check refuses it)."""
    u = msgpack.Unpacker(io.BytesIO(payload), raw=False, read_size=256, max_buffer_size=max(len(payload), 256))
    try:
        if u.read_array_header() != 5:
            return None
        values = []
        for allowed in (_BIN, _BIN, _UINT):
            pos = u.tell()
            if pos >= len(payload) or payload[pos] not in allowed:
                return None
            if allowed is _BIN and (_header_len(payload, pos) or 0) > NONCE_BYTES:
                return None
            values.append(u.unpack())
        pos = u.tell()
        short = pos < len(payload) and payload[pos] in _STR and (_header_len(payload, pos) or 65) <= 64
        kind = u.unpack() if short else None
        if not short:
            u.skip()
        offset = u.tell()
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.OutOfData):
        return None
    session, engine, seq = values
    if len(session) != NONCE_BYTES or len(engine) not in (0, NONCE_BYTES) or not 0 < seq < INT64:
        return None
    return session, engine, seq, kind, offset


_SEQ_SIZES = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}


def _fast_envelope(payload: bytes) -> tuple[bytes, bytes, int, str, int] | None:
    """The envelope as ``Codec.encode`` writes it (array of 5, bin8 nonces, a msgpack uint, a fixstr kind),
    read by slicing: on every frame of both directions, where the general reader's ``Unpacker`` costs
    several times more. None: any other form (then ``_read_envelope`` decides, as it always did)."""
    p = payload
    if len(p) < 23 or p[0] != 0x95 or p[1] != 0xC4 or p[2] != NONCE_BYTES or p[19] != 0xC4:
        return None
    n = p[20]
    if n != 0 and n != NONCE_BYTES:
        return None
    pos = 21 + n
    if pos + 2 > len(p):
        return None
    b = p[pos]
    if b < 0x80:
        seq, pos = b, pos + 1
    else:
        size = _SEQ_SIZES.get(b)
        if size is None or pos + 1 + size > len(p):
            return None
        seq, pos = int.from_bytes(p[pos + 1 : pos + 1 + size], "big"), pos + 1 + size
    b = p[pos] if pos < len(p) else 0
    end = pos + 1 + (b & 0x1F)
    if not 0xA1 <= b <= 0xBF or end > len(p) or not 0 < seq < INT64:
        return None
    try:
        kind = p[pos + 1 : end].decode()
    except UnicodeDecodeError:
        return None
    return p[3:19], p[21 : 21 + n], seq, kind, end


def _salvage_request_id(body: bytes) -> int | None:
    """The request id of a body too large to decode, read without building the rest (msgpack's ``skip``)."""
    u = msgpack.Unpacker(io.BytesIO(body), raw=False, max_str_len=64, max_bin_len=0, max_ext_len=0)
    try:
        for _ in range(min(u.read_map_header(), 16)):
            if body[u.tell()] not in _STR:
                return None
            if u.unpack() != "request_id":
                u.skip()
                continue
            rid = u.unpack()
            return rid if type(rid) is int and -INT64 <= rid < INT64 else None
    except (ValueError, TypeError, IndexError, msgpack.UnpackException, msgpack.OutOfData):
        return None
    return None


_NO_LIMITS = BodyLimits()
_BOUNDS: dict[tuple[BodyLimits, str | None], tuple[dict[str, int], int | None]] = {}


def _bounds(limits: BodyLimits, kind: str | None) -> tuple[dict[str, int], int | None]:
    """``limits.for_kind(kind)`` as msgpack's keyword arguments and the container count, made once per pair
    (a receiver meets a handful). The dict is shared: callers only read it."""
    key = (limits, kind if kind in SCHEMAS else None)
    found = _BOUNDS.get(key)
    if found is None:
        bounds = limits.for_kind(key[1])
        found = _BOUNDS[key] = (bounds, bounds.pop("containers", None))
    return found


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

    def encode(self, msg: Message, session: bytes, seq: int, engine: bytes = b"") -> list[bytes]:
        payload = msgpack.packb([session, engine, seq, msg.KIND, _fields(msg)], use_bin_type=True)
        return [self._tag(payload), payload]

    def decode(self, frames: list[bytes], limits: BodyLimits | None = None) -> Frame | None:
        """The frame, or None (counted in ``dropped``) for a bad tag or envelope. A sound envelope around
        a message that breaks its schema (or ``limits``) gives a ``Frame`` whose ``msg`` is None, with
        ``error``."""
        env = self.envelope(frames)
        return None if env is None else self.body(env, limits)

    def envelope(self, frames: list[bytes]) -> Envelope | None:
        """Checks the tag and reads the envelope only (bounded work, whatever the body); None (counted in
        ``dropped``) for a bad tag or envelope."""
        if len(frames) == 2 and hmac.compare_digest(self._tag(frames[1]), frames[0]):
            env = _fast_envelope(frames[1]) or _read_envelope(frames[1])
            if env is not None:
                session, engine, seq, kind, offset = env
                return Envelope(session, engine, seq, kind, frames[1], offset)
        with self._lock:
            self.dropped += 1
        return None

    def body(self, env: Envelope, limits: BodyLimits | None = None) -> Frame:
        """Decodes and checks the body of ``env`` within the bounds its kind allows."""
        bounds, containers = _bounds(limits or _NO_LIMITS, env.kind)
        hooks: dict[str, Callable[[Any], Any]] = {}
        if containers is not None:
            built = [0]

            def count(container: Any) -> Any:
                built[0] += 1
                if built[0] > containers:
                    raise ValueError(f"more than {containers} lists and maps")
                return container

            hooks = {"list_hook": count, "object_hook": count}
        data = memoryview(env.payload)[env.offset:]
        try:
            body = msgpack.unpackb(data, raw=False, strict_map_key=False, **bounds, **hooks)
        except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as e:
            why = f"{env.kind}: undecodable or over its bounds: {type(e).__name__}: {e}"
            if env.kind == Submit.KIND:
                why = (f"submit: more than {bounds['max_array_len']} token ids (the engine's max_seq_len) or list "
                       f"items, or undecodable: {e}")
            rid = _salvage_request_id(bytes(data)) if env.kind in (Submit.KIND, Abort.KIND) else None
            return Frame(env.session, env.engine, env.seq, None, why, rid)
        try:
            return Frame(env.session, env.engine, env.seq, build(env.kind, body))
        except Invalid as e:
            return Frame(env.session, env.engine, env.seq, None, str(e), e.request_id)


class SeqCheck:
    """The receiving side of one session's sequence numbers: only numbers above the last taken pass."""

    def __init__(self) -> None:
        self.last = 0
        self.old = 0  # replayed or reordered frames dropped
        self.gaps = 0

    def take(self, seq: int) -> int:
        """How many frames were skipped before ``seq`` (0 in order), or -1 for an old number (dropped)."""
        if seq <= self.last:
            self.old += 1
            return -1
        skipped, self.last = seq - self.last - 1, seq
        self.gaps += skipped > 0
        return skipped


# -- connection info: how the proxy finds the workers -----------------------------------------------

ENV_KEY = "TPSERVE_HMAC_KEY"
ENV_REQUEST_ADDR = "TPSERVE_REQUEST_ADDR"
ENV_RESPONSE_ADDR = "TPSERVE_RESPONSE_ADDR"
ENV_OWNER = "TPSERVE_OWNER"  # "pid:start time" of the proxy that spawned the engine (not in attach mode)


@dataclass
class ConnectionInfo:
    """The two ZeroMQ addresses (requests to rank 0, responses from it) and the HMAC key."""

    request_addr: str
    response_addr: str
    key: bytes

    def write(self, path: str) -> None:
        """Creates the connection file, readable by its owner only, in one step (O_EXCL, mode 0600): a
        file already there, from a live engine or a dead one, is never replaced (two engines would
        otherwise share a path and a proxy could attach to the wrong one). Raises ``FileExistsError``."""
        body = json.dumps(
            {"request_addr": self.request_addr, "response_addr": self.response_addr, "key": self.key.hex(),
             "pid": os.getpid()}
        ).encode()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConnectionInfo.taken(path) from None
        try:
            if os.write(fd, body) != len(body):
                raise OSError(f"short write to connection file {path}")
        except BaseException:
            os.unlink(path)  # never leave a half-written file that would block the next engine
            raise
        finally:
            os.close(fd)

    @staticmethod
    def taken(path: str) -> FileExistsError:
        """The error for a connection file that is already there (a worker checks before it loads)."""
        return FileExistsError(
            f"connection file {path} already exists: another engine, live or dead, wrote it. Use another "
            "path, or remove the file if no engine is running from it"
        )

    def remove(self, path: str) -> bool:
        """Removes the connection file if it is still this engine's (same key); True when removed."""
        try:
            if ConnectionInfo.read(path, wait=0.0).key != self.key:
                return False
            os.unlink(path)
            return True
        except (OSError, ValueError):
            return False

    @classmethod
    def read(cls, path: str, wait: float = 2.0) -> ConnectionInfo:
        """Reads a connection file. The file exists an instant before its content (O_EXCL, then one
        write), so an empty or truncated file is read again for up to ``wait`` seconds."""
        deadline = time.monotonic() + wait
        while True:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            try:
                d = json.loads(text)
                break
            except json.JSONDecodeError as e:
                if time.monotonic() >= deadline:
                    raise ValueError(f"connection file {path} is malformed: {e}") from e
                time.sleep(0.02)
        try:
            return cls(d["request_addr"], d["response_addr"], bytes.fromhex(d["key"]))
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"connection file {path} is malformed: {e}") from e


HEARTBEAT_S = 1.0  # both ends send one this often, so either can tell silence from death
MAX_FRAME_BYTES = 64 << 20  # a peer that sends more is disconnected by ZeroMQ, before anything decodes


def open_sockets(conn: ConnectionInfo, bind: bool, proxy_side: bool, send_timeout_ms: int,
                 session: bytes | None = None):
    """The two sockets of one end. Requests: the proxy's PUSH to rank 0's PULL (any number of proxies
    fan in). Responses: rank 0's ROUTER to the proxy's DEALER, whose routing id is its ``session`` nonce,
    so each frame goes to the one proxy it is meant for (a PUSH would deal them out round-robin to every
    proxy connected) and one to a proxy that is not connected fails instead of vanishing
    (``ROUTER_MANDATORY``). The binding end learns its real endpoints (``tcp://host:*`` picks free
    ports). Returns (context, send socket, receive socket, the connection info with resolved addresses)."""
    import zmq

    ctx = zmq.Context(io_threads=1)
    if proxy_side:
        out, inp = ctx.socket(zmq.PUSH), ctx.socket(zmq.DEALER)
        inp.setsockopt(zmq.ROUTING_ID, session)
    else:
        out, inp = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PULL)
        out.setsockopt(zmq.ROUTER_MANDATORY, 1)
    for sock in (out, inp):
        sock.setsockopt(zmq.LINGER, 0)
    inp.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    out.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
    out_addr, in_addr = (
        (conn.request_addr, conn.response_addr) if proxy_side else (conn.response_addr, conn.request_addr)
    )
    if not bind:
        out.connect(out_addr)
        inp.connect(in_addr)
        return ctx, out, inp, conn
    out.bind(out_addr)
    inp.bind(in_addr)
    out_end, in_end = out.getsockopt_string(zmq.LAST_ENDPOINT), inp.getsockopt_string(zmq.LAST_ENDPOINT)
    request, response = (out_end, in_end) if proxy_side else (in_end, out_end)
    return ctx, out, inp, ConnectionInfo(request, response, conn.key)

"""The wire's codec, schemas and sequence numbers, and the proxy's side of a session driven over real
ZeroMQ sockets by this test playing rank 0 (the whole engine is in tests/test_wire_fuzz.py)."""

import asyncio
import hashlib
import hmac
import os
import stat
import threading
import time

import msgpack
import pytest
import zmq

from tpserve import wire
from tpserve.proxy.client import EngineClient
from tpserve.proxy.outputs import RequestOutput
from tpserve.proxy.streams import RequestStream

S, E = wire.new_nonce(), wire.new_nonce()


def signed(key: bytes, obj) -> list[bytes]:
    payload = msgpack.packb(obj, use_bin_type=True)
    return [hmac.new(key, payload, hashlib.sha256).digest(), payload]


def nested(depth: int):
    v: list = []
    for _ in range(depth):
        v = [v]
    return v


def test_roundtrip_with_envelope():
    codec = wire.Codec(wire.new_key())
    msg = wire.Submit(7, [1, 2, 3], {"max_tokens": 4}, True, 1.5, 0.0)
    frame = codec.decode(codec.encode(msg, S, 3, E))
    assert (frame.session, frame.engine, frame.seq, frame.msg) == (S, E, 3, msg)
    assert codec.dropped == 0


def test_tampered_or_foreign_frames_are_dropped_and_counted():
    key = wire.new_key()
    codec = wire.Codec(key)
    tag, payload = codec.encode(wire.Abort(3), S, 1)
    assert codec.decode([tag, payload[:-1] + b"\x04"]) is None  # payload changed
    assert codec.decode(wire.Codec(wire.new_key()).encode(wire.Abort(3), S, 1)) is None  # other key
    assert codec.decode([b"x"]) is None  # wrong frame count
    assert codec.decode(signed(key, None)[:1] + [b"\x93\x01\x02"]) is None  # tag of another payload
    bad_envelopes = [
        ["abort", {"request_id": 1}],  # no envelope
        [S[:8], b"", 1, "abort", {"request_id": 1}],  # short nonce
        [S, b"", 0, "abort", {"request_id": 1}],  # sequence numbers start at 1
        [S, b"", 1.0, "abort", {"request_id": 1}],
        [S, b"", -5, "abort", {"request_id": 1}],
        [S, b"x", 1, "abort", {"request_id": 1}],  # engine nonce neither empty nor 16 bytes
    ]
    for env in bad_envelopes:
        assert codec.decode(signed(key, env)) is None, env
    junk = b"\x93\x01\x02"
    assert codec.decode([hmac.new(key, junk, hashlib.sha256).digest(), junk]) is None  # signed garbage
    deep = b"\x91" * 100_000 + b"\x90"  # past msgpack's own stack limit
    assert codec.decode([hmac.new(key, deep, hashlib.sha256).digest(), deep]) is None
    assert codec.dropped == 4 + len(bad_envelopes) + 2


HOSTILE_IDS = [1000000.5, "req", b"x", None, [1, 2], True, 2**63, 2**64 - 1, {"a": 1}, nested(1000)]  # msgpack
# carries integers in [-2**63, 2**64) only: 2**70 cannot even be sent


@pytest.mark.parametrize("rid", HOSTILE_IDS)
@pytest.mark.parametrize("kind", ["submit", "abort"])
def test_a_request_id_that_is_not_an_int64_is_refused_without_an_id(kind, rid):
    key = wire.new_key()
    codec = wire.Codec(key)
    body = {"request_id": rid}
    if kind == "submit":
        body |= {"prompt_token_ids": [1], "params": {}, "stream": False, "arrival_time": 0.0, "rank0_time": 0.0}
    frame = codec.decode(signed(key, [S, b"", 1, kind, body]))
    assert frame is not None and frame.msg is None and frame.request_id is None
    assert f"{kind}.request_id" in frame.error


GOOD_SUBMIT = {"request_id": 5, "prompt_token_ids": [1, 2], "params": {"max_tokens": 2}, "stream": False,
               "arrival_time": 1.0, "rank0_time": 0.0}


@pytest.mark.parametrize("name, value", [
    ("prompt_token_ids", [1, -1]), ("prompt_token_ids", [2**31]), ("prompt_token_ids", [1.0]),
    ("prompt_token_ids", [True]), ("prompt_token_ids", "1 2"), ("prompt_token_ids", nested(1000)),
    ("params", [1]), ("params", None), ("params", "max_tokens=2"), ("params", {"max_tokens": nested(1000)}),
    ("params", {"stop_token_ids": [[1]]}), ("params", {1: 2}), ("params", {None: 2}),
    ("stream", 1), ("stream", None), ("arrival_time", float("nan")), ("arrival_time", float("inf")),
    ("arrival_time", "now"), ("arrival_time", 1), ("rank0_time", None),
])
def test_a_bad_submit_field_is_refused_with_its_request_id(name, value):
    key = wire.new_key()
    frame = wire.Codec(key).decode(signed(key, [S, b"", 1, "submit", GOOD_SUBMIT | {name: value}]))
    assert frame.msg is None and frame.request_id == 5 and f"submit.{name}" in frame.error


def test_unknown_missing_and_misplaced_fields_and_kinds():
    key = wire.new_key()
    codec = wire.Codec(key)

    def decode(kind, body):
        return codec.decode(signed(key, [S, b"", 1, kind, body]))

    f = decode("submit", GOOD_SUBMIT | {"extra": nested(1000)})
    assert f.msg is None and f.request_id == 5 and "unknown field 'extra'" in f.error
    f = decode("submit", {k: v for k, v in GOOD_SUBMIT.items() if k != "params"})
    assert f.msg is None and f.request_id == 5 and "missing field 'params'" in f.error
    for kind, body in [("nope", {}), (None, {}), (["submit"], {}), ("abort", [5]), ("abort", None),
                       ("shutdown", {"drain": 1}), ("shutdown", {"drain": "yes"}), ("heartbeat", {"time": None}),
                       ("hello", {"proxy_pid": -1}), ("ready", {"info": nested(1000)}),
                       ("outputs", {"deltas": [{"request_id": 1}], "stats": None}),
                       ("outputs", {"deltas": [], "stats": {"k": nested(1000)}})]:
        f = decode(kind, body)
        assert f is not None and f.msg is None and f.request_id is None and f.error, (kind, body)
    assert codec.dropped == 0  # sound envelopes: refused with a reason, not dropped unseen


def test_messages_are_rebuilt_from_checked_values_only():
    key = wire.new_key()
    body = GOOD_SUBMIT | {"params": {"max_tokens": 2, "stop_token_ids": [3, 4]}}
    msg = wire.Codec(key).decode(signed(key, [S, b"", 1, "submit", body])).msg
    assert msg == wire.Submit(5, [1, 2], {"max_tokens": 2, "stop_token_ids": [3, 4]}, False, 1.0, 0.0)
    assert msg.prompt_token_ids is not body["prompt_token_ids"]
    assert msg.params["stop_token_ids"] is not body["params"]["stop_token_ids"]
    good = wire.error_delta(1, "") | {"token_ids": [2], "finish_reason": "stop", "error": None, "metrics": {"t": 1.0}}
    out = wire.Codec(key).decode(signed(key, [S, E, 1, "outputs", {"deltas": [good | {"x": 1}], "stats": None}]))
    assert out.msg.deltas == [good]  # unknown delta keys are not carried on


def test_error_delta_is_a_valid_final_delta():
    key = wire.new_key()
    codec = wire.Codec(key)
    frame = codec.decode(codec.encode(wire.Outputs([wire.error_delta(9, "why")]), S, 1, E))
    assert frame.msg.deltas == [wire.error_delta(9, "why")]
    d = frame.msg.deltas[0]
    assert (d["request_id"], d["token_ids"], d["finished"], d["finish_reason"], d["error"]) == (9, [], True, "error",
                                                                                               "why")


def test_sequence_check():
    seq = wire.SeqCheck()
    assert [seq.take(n) for n in (1, 2, 3)] == [0, 0, 0]
    assert seq.take(3) == -1 and seq.take(1) == -1  # replayed
    assert seq.take(7) == 3  # 4, 5, 6 lost
    assert seq.take(5) == -1  # late: after 7, never taken
    assert (seq.last, seq.old, seq.gaps) == (7, 3, 1)


def test_no_pickle_on_the_wire():
    payload = wire.pack(wire.Outputs([wire.error_delta(1, "x")]))
    assert b"pickle" not in payload and not payload.startswith(b"\x80")


def test_items_roundtrip():
    items = [wire.Submit(1, [5]), wire.Abort(1), wire.Shutdown(drain=True)]
    assert wire.unpack_items(wire.pack_items(items)) == items


def test_connection_file_is_private(tmp_path):
    info = wire.ConnectionInfo("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", wire.new_key())
    path = str(tmp_path / "conn.json")
    info.write(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert wire.ConnectionInfo.read(path) == info
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="malformed"):
        wire.ConnectionInfo.read(str(tmp_path / "bad.json"))


# -- the proxy's side of a session, against this test playing rank 0 over real sockets --------------------


class Rank0Side:
    """This test's end of the wire: rank 0's two sockets, speaking the protocol with the real codec."""

    def __init__(self, client: EngineClient) -> None:
        self.codec = wire.Codec(client.conn.key)
        self.ctx = zmq.Context()
        self.router, self.pull = self.ctx.socket(zmq.ROUTER), self.ctx.socket(zmq.PULL)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.connect(client.conn.response_addr)
        self.pull.connect(client.conn.request_addr)
        self.seq = 0

    def recv(self, timeout: float = 5.0) -> wire.Frame:
        assert self.pull.poll(int(timeout * 1000)), "nothing from the proxy"
        return self.codec.decode(self.pull.recv_multipart())

    def send(self, msg: wire.Message, session: bytes, seq: int | None = None, engine: bytes = E,
             route: bytes | None = None) -> None:
        """To the proxy whose routing id is ``route`` (by default the session's)."""
        if seq is None:
            self.seq += 1
            seq = self.seq
        deadline = time.monotonic() + 5
        while True:  # the proxy's socket may still be connecting: EHOSTUNREACH until then
            try:
                self.router.send_multipart([route or session, *self.codec.encode(msg, session, seq, engine)])
                return
            except zmq.ZMQError:
                assert time.monotonic() < deadline
                time.sleep(0.01)

    def close(self) -> None:
        self.router.close(0)
        self.pull.close(0)
        self.ctx.term()


@pytest.fixture
def session():
    """A proxy after its handshake with this test as rank 0, and its dispatch thread running."""
    client = EngineClient(wire.ConnectionInfo("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", wire.new_key()),
                          bind=True, workers=None)
    rank0 = Rank0Side(client)
    info: list = []
    t = threading.Thread(target=lambda: info.append(client.handshake(10)))
    t.start()
    hello = rank0.recv()
    assert isinstance(hello.msg, wire.Hello) and hello.session == client.session and hello.seq == 1
    rank0.send(wire.Ready({"x": 1}), client.session)
    t.join(10)
    assert info == [{"x": 1}]
    client.start_dispatcher()
    yield client, rank0
    client.close()
    rank0.close()


def stream_for(client: EngineClient, rid: int) -> RequestStream:
    rs = RequestStream(RequestOutput(rid, None, [1]), None, lambda _: None)
    client.submit(rs, wire.Submit(rid, [1], {}, True, time.time(), 0.0))
    return rs


def wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_proxy_frames_are_numbered_in_order(session):
    client, rank0 = session
    stream_for(client, 1)
    client.send(wire.Abort(1))
    seqs = []
    for _ in range(3):  # heartbeats may come between
        frame = rank0.recv()
        assert frame.session == client.session
        seqs.append(frame.seq)
    assert seqs == sorted(seqs) and len(set(seqs)) == 3 and seqs[0] == 2  # 1 was the Hello


def test_replayed_foreign_and_other_engine_frames_are_ignored(session):
    client, rank0 = session
    rs = stream_for(client, 1)
    rank0.send(wire.Outputs([wire.error_delta(1, "") | {"token_ids": [5], "finished": False, "finish_reason": None,
                                                        "error": None}]), client.session)
    wait_for(lambda: rs.output.token_ids == [5])
    final = wire.Outputs([wire.error_delta(1, "not for you")])
    rank0.send(final, client.session, seq=2)  # replays the seq of the Outputs above
    rank0.send(final, wire.new_nonce(), seq=3, route=client.session)  # another session's, misdelivered
    rank0.send(final, client.session, seq=3, engine=wire.new_nonce())  # another engine's
    rank0.seq = 2
    rank0.send(wire.Outputs([wire.error_delta(1, "ok") | {"finish_reason": "stop", "error": None}]),
               client.session)
    out = rs.result(5)
    assert out.token_ids == [5] and out.finish_reason == "stop" and client.dead is None
    assert client.inbound.old == 1 and client.foreign == 2


def test_a_gap_is_engine_death_and_ends_every_wait(session):
    client, rank0 = session
    sync_result, sync_iter, async_iter = stream_for(client, 1), stream_for(client, 2), stream_for(client, 3)
    chunks: list = []
    it = threading.Thread(target=lambda: chunks.extend(sync_iter))
    it.start()

    async def consume():
        return [c async for c in async_iter]

    rank0.send(wire.Heartbeat(1.0), client.session, seq=rank0.seq + 5)  # frames 2..5 never came
    assert sync_result.result(5).finish_reason == "error"
    assert "4 frame(s) from the engine were lost" in sync_result.output.error
    it.join(5)
    assert not it.is_alive() and chunks[-1].finished and chunks[-1].finish_reason == "error"
    async_chunks = asyncio.run(asyncio.wait_for(consume(), 5))
    assert async_chunks[-1].finish_reason == "error"
    with pytest.raises(Exception, match="lost"):
        stream_for(client, 4)


def test_bad_tag_frames_do_not_count_as_signs_of_life():
    client = EngineClient(wire.ConnectionInfo("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", wire.new_key()),
                          bind=True, workers=None, silence_timeout=1.0)
    rank0 = Rank0Side(client)
    try:
        t = threading.Thread(target=client.handshake, args=(10,))
        t.start()
        rank0.recv()
        rank0.send(wire.Ready({}), client.session)
        t.join(10)
        client.start_dispatcher()
        rs = stream_for(client, 1)
        forged = wire.Codec(wire.new_key())
        start = time.monotonic()
        while rs.output.finish_reason is None and time.monotonic() - start < 30:  # forged frames all along
            rank0.router.send_multipart([client.session, *forged.encode(wire.Heartbeat(1.0), client.session,
                                                                       rank0.seq + 1, E)])
            time.sleep(0.05)
        assert rs.output.finish_reason == "error" and "no word from the workers" in rs.output.error
        assert client.codec.dropped > 5  # it died of silence while forged heartbeats kept coming
    finally:
        client.close()
        rank0.close()


def test_the_dispatch_thread_cannot_die_silently(session):
    client, rank0 = session
    rs = stream_for(client, 1)

    def broken(deltas):
        raise KeyError("injected")

    client._route = broken  # a fault where no real input reaches one any more (the schemas check deltas)
    rank0.send(wire.Outputs([wire.error_delta(1, "x")]), client.session)
    out = rs.result(5)
    assert out.finish_reason == "error" and "dispatch thread failed: KeyError" in out.error
    client._dispatcher.join(5)
    assert not client._dispatcher.is_alive()


# -- rank 0's side: the real Rank0IO against the real proxy client ----------------------------------------


def test_rank0_frames_stay_in_order_when_the_proxy_stalls():
    """The loop thread sends a publish at once when nothing is queued, else queues it behind the sender
    thread's bounded wait: while the proxy reads nothing, frames queue; once it reads, every delta arrives
    once, in order, without a gap in the sequence (a gap would mark the engine dead)."""
    from tpserve.worker.rank0_io import Rank0IO

    client = EngineClient(wire.ConnectionInfo("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", wire.new_key()),
                          bind=True, workers=None)
    io = Rank0IO(client.conn, bind=False, heartbeat_timeout=60)
    try:
        from mpi4py import MPI

        from tpserve.executor.request_queue import RequestQueue

        requests = RequestQueue(MPI.COMM_SELF)
        io.start_intake(requests, wire.Ready({"x": 1}))
        assert client.handshake(10) == {"x": 1}
        rs = RequestStream(RequestOutput(1, None, [1]), None, lambda _: None)
        client.submit(rs, wire.Submit(1, [1], {}, True, time.time()))  # rank 0 sends outputs of its requests only
        wait_for(lambda: 1 in io.open_ids, 10)

        def publish(i: int, finished: bool = False) -> None:  # 5,000 ids a frame: the buffers fill fast
            io.send(wire.Outputs([{"request_id": 1, "token_ids": [i] + [0] * 4999, "finished": finished,
                                   "finish_reason": "length" if finished else None, "error": None,
                                   "metrics": {}, "num_cached_tokens": None}]))
            time.sleep(0.0005)  # a loop step apart

        n, backlog_at = 0, None
        deadline = time.monotonic() + 30
        while backlog_at is None or n < backlog_at + 50:  # the proxy reads nothing: its buffers fill up
            publish(n)
            n += 1
            if backlog_at is None and io.queued >= 20:
                backlog_at = n
            assert time.monotonic() < deadline, "the proxy's buffers never filled"
        at_once = io.counts["sent_at_once"]
        client.start_dispatcher()  # it reads again: the sender drains its queue, then direct sends resume
        during_drain = 0
        for _ in range(200):  # publishes go on while the queue drains: none may overtake a queued one
            during_drain += io.queued > 0
            publish(n)
            n += 1
        wait_for(lambda: io.queued == 0, 30)
        publish(n, finished=True)
        firsts = [chunk.token_ids[0] for chunk in rs]
        assert firsts == list(range(n + 1)) and client.dead is None
        assert at_once > 0 and during_drain > 0 and io.counts["sent_at_once"] > at_once  # both ways, both times
    finally:
        io.close(timeout=2)
        client.close()


def test_delta_log_probabilities_are_checked():
    """A delta's log-probabilities: [[token_id, logprob, rank], ...] per position, None for a prompt's first."""
    good = {"request_id": 1, "token_ids": [3], "finished": False, "finish_reason": None, "error": None,
            "metrics": {}, "num_cached_tokens": None, "logprobs": [[[3, -0.5, 1], [4, -1.5, 2]]],
            "prompt_logprobs": [None, [[9, -2.0, 7]]]}
    msg = wire.build("outputs", {"deltas": [good], "stats": None})
    assert msg.deltas[0]["logprobs"] == good["logprobs"] and msg.deltas[0]["prompt_logprobs"] == good["prompt_logprobs"]
    old = {k: v for k, v in good.items() if k not in ("logprobs", "prompt_logprobs")}
    assert wire.build("outputs", {"deltas": [old], "stats": None}).deltas[0]["logprobs"] is None
    for bad in ([[[3, 0.5, 1]]], [[[3, float("nan"), 1]]], [[[3, -1.0, 0]]], [[[-3, -1.0, 1]]], [[[3, -1, 1]]],
                [[[3, -1.0]]], [[]], [[[3, -1.0, 1]] * 22], "x", [None] * 2 + [5]):
        with pytest.raises(wire.Invalid):
            wire.build("outputs", {"deltas": [good | {"logprobs": bad}], "stats": None})


def test_a_submit_body_is_decoded_within_its_kinds_bounds():
    """Rank 0's bounds: token ids up to max_seq_len, and a few thousand lists at most, so a body of millions
    of small lists (each list within the length bound) is refused unbuilt, with an error for its id."""
    key = wire.new_key()
    codec = wire.Codec(key)
    limits = wire.BodyLimits(array=2100, intake=True)
    many = dict(GOOD_SUBMIT, request_id=7, prompt_token_ids=[[[]] * 50_000] * 60)  # 3 million empty lists
    f = codec.decode(signed(key, [S, b"", 1, "submit", many]), limits)
    assert f.msg is None and f.request_id == 7 and "lists and maps" in f.error, f.error
    long = dict(GOOD_SUBMIT, request_id=8, prompt_token_ids=[1] * 70_000)
    f = codec.decode(signed(key, [S, b"", 1, "submit", long]), limits)
    assert f.msg is None and f.request_id == 8 and "token ids" in f.error, f.error
    f = codec.decode(signed(key, [S, b"", 1, "submit", dict(GOOD_SUBMIT, prompt_token_ids=[1] * 2100)]), limits)
    assert f.msg is not None and len(f.msg.prompt_token_ids) == 2100


def test_the_fast_envelope_reader_agrees_with_the_general_one():
    """Every frame's envelope is read by slicing when it has ``Codec.encode``'s form; on that form, and on
    random corruptions of it that the fast reader still takes, both readers give the same envelope (the
    fast one declines everything else, which the general reader then judges as before)."""
    import random

    rng = random.Random(7)
    codec = wire.Codec(wire.new_key())
    taken = 0
    for seq in (1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1):
        for engine in (b"", wire.new_nonce()):
            for msg in (wire.Heartbeat(1.0), wire.Submit(3, [1, 2], {}, False, 1.0), wire.Outputs([], None)):
                payload = codec.encode(msg, wire.new_nonce(), seq, engine)[1]
                assert wire._fast_envelope(payload) is not None
                assert wire._fast_envelope(payload) == wire._read_envelope(payload)
                for _ in range(300):
                    bad = bytearray(payload)
                    for _ in range(rng.randint(1, 3)):
                        bad[rng.randrange(min(len(bad), 45))] = rng.randrange(256)
                    cut = bytes(bad[: rng.randint(0, len(bad))]) if rng.random() < 0.3 else bytes(bad)
                    fast = wire._fast_envelope(cut)
                    if fast is not None:
                        taken += 1
                        assert fast == wire._read_envelope(cut), cut
    assert taken > 1000


def test_a_hello_is_answered_once_however_it_meets_the_engine_becoming_ready():
    """READY answers each Hello once. The engine can become ready (``_set_answer``, the main thread) between
    the intake opening a session for a Hello and handling it; that interleaving is forced here, and it sent
    READY twice (seen once in a loaded CI run). A Hello handled before READY exists is answered when it does."""
    from test_wire_fuzz import WireClient

    from tpserve.worker.rank0_io import Rank0IO

    ready = wire.Ready({"x": 1})

    class ReadyBetweenOpenAndHandle(Rank0IO):
        def _handle(self, s, frame):
            if isinstance(frame.msg, wire.Hello) and self.answer is None:
                self._set_answer(ready)
            super()._handle(s, frame)

    for cls, ready_later in ((ReadyBetweenOpenAndHandle, False), (Rank0IO, True)):
        io = cls(wire.ConnectionInfo("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", wire.new_key()), bind=True,
                 heartbeat_timeout=60)
        client = WireClient(io.conn)
        try:
            client.send("hello", {"proxy_pid": os.getpid()}, "hello")
            if ready_later:
                wait_for(lambda io=io: io.session is not None, 10)
                client.pump(0.3)
                assert client.other == []  # nothing to answer with yet
                io.send(ready)
            client.wait(lambda c=client: bool(c.other), 10)
            client.pump(0.5)
            assert client.other == [ready], (cls.__name__, client.other)
        finally:
            client.close()
            io.close(timeout=2)

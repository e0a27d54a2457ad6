"""Wire fuzzing against a real engine (attach mode, TP 1): frames with bad tags, and signed hostile
payloads of every message kind, replays, gaps and other sessions' frames, sent with real ZeroMQ sockets
under the engine's key. The engine must not die, must answer an error for every bad message that has a
usable request id, must refuse a second client while one is attached, and must give the same greedy
answers before, during and after. The counts go to docs/reliability.md ("Wire: integrity and fuzzing")."""

from __future__ import annotations

import hashlib
import hmac
import os
import sys
import time
from collections import Counter
from pathlib import Path

import msgpack
import pytest
import zmq
from helpers import built_model, kill_session, launch_logged, listener_failed

from tpserve import LLM, EngineBusyError, SamplingParams, wire
from tpserve.proxy.launcher import mpi_environment, mpirun_path

HEARTBEAT_TIMEOUT = 2.0  # the engine's; a silent client's session ends after it
GREEDY = SamplingParams(max_tokens=8, temperature=0).to_dict()
PROMPTS = [[1, 2, 3, 4], [11, 22, 33]]


def nested(depth: int) -> list:
    v: list = []
    for _ in range(depth):
        v = [v]
    return v


class WireClient:
    """This test's proxy: the protocol spoken by hand over real sockets, so that any frame can be sent."""

    def __init__(self, conn: wire.ConnectionInfo) -> None:
        self.key = conn.key
        self.codec = wire.Codec(conn.key)
        self.nonce = wire.new_nonce()
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.ROUTING_ID, self.nonce)
        for sock, addr in ((self.push, conn.request_addr), (self.dealer, conn.response_addr)):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(addr)
        self.seq = 0
        self.inbound = wire.SeqCheck()
        self.engine: bytes | None = None
        self.sent: list[list[bytes]] = []  # every frame sent, to replay
        self.counts: Counter[str] = Counter()
        self.deltas: dict[int, list[dict]] = {}
        self.other: list[wire.Message] = []
        self.next_heartbeat = 0.0

    def frames(self, kind, body, seq: int, session: bytes | None = None) -> list[bytes]:
        payload = msgpack.packb([session or self.nonce, b"", seq, kind, body], use_bin_type=True)
        return [hmac.new(self.key, payload, hashlib.sha256).digest(), payload]

    def raw(self, frames: list[bytes], what: str) -> None:
        self.push.send_multipart(frames)
        self.sent.append(frames)
        self.counts[what] += 1

    def send(self, kind, body, what: str, seq: int | None = None, session: bytes | None = None) -> None:
        """The next frame of this session (or a chosen number, or another session's)."""
        if seq is None:
            self.seq += 1
            seq = self.seq
        self.raw(self.frames(kind, body, seq, session), what)

    def heartbeat(self) -> None:
        if time.monotonic() >= self.next_heartbeat:
            self.send("heartbeat", {"time": time.time()}, "heartbeat")
            self.next_heartbeat = time.monotonic() + 0.5

    def pump(self, timeout: float) -> None:
        """Receives for ``timeout`` seconds: rank 0's frames must be this session's, signed, in order."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.heartbeat()
            if not self.dealer.poll(50):
                continue
            frame = self.codec.decode(self.dealer.recv_multipart())
            assert frame is not None and frame.msg is not None and frame.session == self.nonce
            assert self.engine in (None, frame.engine)
            self.engine = frame.engine
            assert self.inbound.take(frame.seq) == 0, "rank 0 skipped or repeated a frame"
            if isinstance(frame.msg, wire.Outputs):
                for d in frame.msg.deltas:
                    self.deltas.setdefault(d["request_id"], []).append(d)
            elif not isinstance(frame.msg, wire.Heartbeat):
                self.other.append(frame.msg)

    def wait(self, done, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "no answer from the engine"
            self.pump(0.1)

    def finished(self, rid: int) -> dict | None:
        return next((d for d in self.deltas.get(rid, []) if d["finished"]), None)

    def generate(self, rid: int, prompt: list[int]) -> list[int]:
        self.send("submit", {"request_id": rid, "prompt_token_ids": prompt, "params": GREEDY, "stream": False,
                             "arrival_time": time.time(), "rank0_time": 0.0}, "valid submit")
        self.wait(lambda: self.finished(rid) is not None)
        assert self.finished(rid)["finish_reason"] in ("length", "stop"), self.finished(rid)
        return [t for d in self.deltas[rid] for t in d["token_ids"]]

    def close(self) -> None:
        self.push.close(0)
        self.dealer.close(0)
        self.ctx.term()


def submit(rid, **changes) -> dict:
    return {"request_id": rid, "prompt_token_ids": [1, 2, 3], "params": GREEDY, "stream": False,
            "arrival_time": 1.0, "rank0_time": 0.0} | changes


HOSTILE_IDS = [1000000.5, "req", b"x", None, [1, 2], True, 2**63, 2**64 - 1, -1.0, {"id": 1}, nested(1000)]
# Bad fields of a Submit whose request id is usable: each must be answered with an error for that id.
BAD_SUBMIT_FIELDS = [
    ("prompt_token_ids", [1, -1]), ("prompt_token_ids", [2**31]), ("prompt_token_ids", [1.5]),
    ("prompt_token_ids", [None]), ("prompt_token_ids", "abc"), ("prompt_token_ids", nested(1000)),
    ("prompt_token_ids", [10**6]),  # inside the wire's range, outside the vocabulary: the executor answers
    ("prompt_token_ids", []),
    ("params", [1]), ("params", None), ("params", "greedy"), ("params", nested(1000)),
    ("params", {"max_tokens": nested(1000)}), ("params", {"max_tokens": 2**64 - 1}),
    ("params", {"top_k": 2**64 - 1}), ("params", {"stop_token_ids": [2**64 - 1]}), ("params", {"max_tokens": -1}),
    ("params", {"temperature": float("nan")}), ("params", {"temperature": float("inf")}),
    ("params", {"top_p": 0.0}), ("params", {"seed": 2**63}), ("params", {1: 2}),
    ("stream", 1), ("stream", "yes"), ("stream", None), ("arrival_time", float("nan")), ("arrival_time", "now"),
    ("arrival_time", None), ("rank0_time", nested(1000)), ("extra", nested(1000)),
]
# Every kind with hostile bodies and no usable request id: dropped and counted, no answer, no effect.
NO_ID_PAYLOADS = (
    [("submit", submit(rid)) for rid in HOSTILE_IDS]
    + [("abort", {"request_id": rid}) for rid in HOSTILE_IDS]
    + [("shutdown", {"drain": v}) for v in (1, 0, "yes", None, [True], nested(1000))]
    + [("shutdown", {"drain": False, "extra": 1}), ("shutdown", {}), ("shutdown", [False]), ("shutdown", None)]
    + [("hello", {"proxy_pid": v}) for v in (-1, 1.5, "me", nested(1000))]
    + [("heartbeat", {"time": v}) for v in (float("nan"), float("inf"), "now", None, nested(1000))]
    + [("abort", {}), ("abort", [1]), ("abort", nested(1000)), ("submit", None), ("submit", "x")]
    + [(kind, {}) for kind in ("nope", "", "Submit", "SHUTDOWN")]
    + [(kind, {"request_id": 1}) for kind in (None, 5, 1.5, b"submit", ["submit"], nested(1000))]
    # kinds that only rank 0 sends, well formed or not
    + [("ready", {"info": {}}), ("ready", {"info": nested(1000)}), ("outputs", {"deltas": [], "stats": None}),
       ("outputs", {"deltas": [wire.error_delta(7, "x")], "stats": None}), ("refused", {"reason": "x"}),
       ("goodbye", {"reason": "x"}), ("engine_dead", {"message": "x", "rank": 0}),
       ("startup_error", {"message": "x", "traceback": "", "rank": 0})]
)


def bad_tag_frames(client: WireClient) -> list[list[bytes]]:
    good = client.frames("shutdown", {"drain": False}, client.seq + 1)
    other_key = wire.Codec(wire.new_key()).encode(wire.Shutdown(False), client.nonce, client.seq + 1)
    return [
        [os.urandom(32), good[1]], other_key, [good[0], good[1] + b"\x00"], [good[0][:-1], good[1]],
        [good[1]], [good[0]], [b"", b""], [good[0], good[1], b"x"], [os.urandom(32), os.urandom(200)],
    ]


class Engine:
    """``mpirun -n 1 python -m tpserve.worker --connection-file FILE``, in a session of its own."""

    def __init__(self, tmp_path: Path, **env: str) -> None:
        self.conn_path = tmp_path / "engine.json"
        self.log_path = tmp_path / "workers.log"
        self.cmd = [mpirun_path(), "-n", "1", sys.executable, "-m", "mpi4py", "-m", "tpserve.worker",
                    "--model", str(built_model("llama")), "--max-seq-len", "2100", "--connection-file",
                    str(self.conn_path), "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT)]
        self.env = mpi_environment(1) | {"TPSERVE_SHUTDOWN_TRACE_DIR": str(tmp_path / "trace")} | env
        self.popen = launch_logged(self.cmd, self.env, self.log_path)
        self.relaunched = False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def trace(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.conn_path.parent.glob("trace/*.log"))

    def connection(self) -> wire.ConnectionInfo:
        deadline = time.monotonic() + 120
        while not self.conn_path.exists():
            if not self.relaunched and listener_failed(self.popen, self.log_path):
                self.relaunched, self.popen = True, launch_logged(self.cmd, self.env, self.log_path)
            assert self.popen.poll() is None, self.log()
            assert time.monotonic() < deadline, "no connection file"
            time.sleep(0.1)
        return wire.ConnectionInfo.read(str(self.conn_path))

    def assert_alive(self) -> None:
        assert self.popen.poll() is None, f"the engine died:\n{self.log()[-4000:]}"

    def kill(self) -> None:
        """kill -9 of mpirun and every rank."""
        kill_session(self.popen)


@pytest.fixture
def engine(tmp_path):
    e = Engine(tmp_path)
    yield e
    if e.popen.poll() is None:
        e.kill()


def attach_when_free(path: Path, timeout: float) -> LLM:
    """LLM(connect=...) once the last client's session is over (refused until then)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return LLM(connect=str(path))
        except EngineBusyError:
            assert time.monotonic() < deadline, "still refused after the last client went silent"
            time.sleep(0.2)


def test_hostile_frames_do_not_hurt_the_engine(engine):
    conn = engine.connection()
    fuzz = WireClient(conn)
    start = time.monotonic()
    try:
        fuzz.send("hello", {"proxy_pid": os.getpid()}, "hello")
        fuzz.wait(lambda: any(isinstance(m, wire.Ready) for m in fuzz.other))
        before = [fuzz.generate(i, p) for i, p in enumerate(PROMPTS)]

        # A second client while this one is attached is refused, at once and clearly.
        t0 = time.monotonic()
        with pytest.raises(EngineBusyError, match="another client is attached"):
            LLM(connect=str(engine.conn_path))
        assert time.monotonic() - t0 < 9  # refused, not left to wait out the 10 s attach bound
        fuzz.pump(0.2)

        for frames in bad_tag_frames(fuzz):
            fuzz.raw(frames, "bad tag or frame count")
        expect_error = {}
        for i, (name, value) in enumerate(BAD_SUBMIT_FIELDS):
            rid = 1000 + i
            expect_error[rid] = name
            fuzz.send("submit", submit(rid, **{name: value}), "bad field, usable id")
        abort_ids = [2000 + i for i in range(3)]  # bad Aborts with a usable id are answered too
        fuzz.send("abort", {"request_id": abort_ids[0], "extra": 1}, "bad field, usable id")
        fuzz.send("abort", {"request_id": abort_ids[1], "x": nested(1000)}, "bad field, usable id")
        fuzz.send("submit", {"request_id": abort_ids[2]}, "bad field, usable id")  # fields missing
        expect_error |= dict.fromkeys(abort_ids, "request_id")
        for kind, body in NO_ID_PAYLOADS:
            fuzz.send(kind, body, "hostile, no usable id")
        # Replays: every frame accepted so far again, byte for byte (a duplicate Submit would be answered),
        # and Shutdowns under numbers already taken, as a captured Shutdown would come back.
        for frames in list(fuzz.sent):
            fuzz.raw(frames, "replayed")
        for seq in (1, 2, fuzz.seq):
            fuzz.send("shutdown", {"drain": False}, "replayed shutdown", seq=seq)
            fuzz.send("shutdown", {"drain": True}, "replayed shutdown", seq=seq)
        # Another session's frames (not its Hello): ignored, whatever they say.
        for kind, body in (("shutdown", {"drain": False}), ("submit", submit(3000)), ("abort", {"request_id": 0})):
            fuzz.send(kind, body, "another session's", seq=fuzz.seq + 1, session=wire.new_nonce())
        # A gap: frames "lost" on the way to rank 0 are traced, the session carries on.
        fuzz.seq += 10
        fuzz.send("heartbeat", {"time": time.time()}, "after a gap")

        fuzz.wait(lambda: all(fuzz.finished(rid) for rid in expect_error))
        for rid, name in expect_error.items():
            d = fuzz.finished(rid)
            assert d["finish_reason"] == "error" and d["token_ids"] == [] and d["error"], (rid, name, d)
        fuzz.pump(0.5)  # nothing else may come back: no answer to replays, to another session, to no-id frames
        assert set(fuzz.deltas) == set(range(len(PROMPTS))) | set(expect_error), set(fuzz.deltas)
        assert all(len(fuzz.deltas[rid]) == 1 for rid in expect_error)  # answered once, replay or not
        assert [type(m) for m in fuzz.other] == [wire.Ready]
        engine.assert_alive()

        during = [fuzz.generate(10 + i, p) for i, p in enumerate(PROMPTS)]
        assert during == before
        long = GREEDY | {"max_tokens": 2000, "ignore_eos": True}  # still running when this client goes silent
        fuzz.send("submit", submit(99, params=long, stream=True), "valid submit")
        fuzz.wait(lambda: 99 in fuzz.deltas)
    finally:
        fuzz.close()  # this client now falls silent: its session ends after the heartbeat timeout
    engine.assert_alive()

    # After its session ended, its frames replayed (Hello first) open nothing and end nothing.
    time.sleep(HEARTBEAT_TIMEOUT + 0.5)
    replayer = WireClient(conn)
    for frames in fuzz.sent:
        replayer.raw(frames, "replayed after the session ended")
    replayer.pump(0.5)
    assert not replayer.deltas and not replayer.other
    engine.assert_alive()

    with attach_when_free(engine.conn_path, 10) as llm:
        for frames in fuzz.sent:  # and again while another client is attached
            replayer.raw(frames, "replayed into the next client's session")
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
        assert [o.token_ids for o in outs] == before
        assert llm.client.dead is None
    replayer.close()
    assert engine.popen.wait(30) == 0, engine.log()[-4000:]
    trace = engine.trace()
    assert "frames_lost" in trace and "session_opened" in trace and "session_closed\taborted=1" in trace
    sent = fuzz.counts + replayer.counts
    print(f"\nwire fuzz: {sum(sent.values())} frames in {time.monotonic() - start:.1f} s: {dict(sent)}")
    print([line for line in trace.splitlines() if "sockets_closed" in line])


def test_a_frame_that_cannot_be_delivered_ends_the_engine_after_the_bound(tmp_path):
    """Rank 0 never drops a frame of the live session: it waits for the proxy, here one that still sends
    heartbeats but has closed its receiving socket, and past TPSERVE_SEND_TIMEOUT the engine ends."""
    engine = Engine(tmp_path, TPSERVE_SEND_TIMEOUT="2")
    client = WireClient(engine.connection())
    try:
        client.send("hello", {"proxy_pid": os.getpid()}, "hello")
        client.wait(lambda: any(isinstance(m, wire.Ready) for m in client.other))
        client.dealer.close(0)
        client.send("submit", submit(1, stream=True), "valid submit")
        start = time.monotonic()
        while engine.popen.poll() is None:
            assert time.monotonic() - start < 30, "the engine kept waiting"
            client.heartbeat()
            time.sleep(0.05)
        assert time.monotonic() - start > 1.5  # it did wait for the bound
        trace = engine.trace()
        assert "engine_dead" in trace and "could not be delivered to the proxy for 2 s" in trace, trace[-3000:]
    finally:
        client.push.close(0)
        client.ctx.term()
        if engine.popen.poll() is None:
            engine.kill()

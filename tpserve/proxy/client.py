"""The proxy's ZeroMQ side: sockets, the handshake, sending, and the dispatch thread that routes rank 0's
responses to request streams and watches the workers' liveness."""

from __future__ import annotations

import os
import re
import threading
import time

import zmq

from tpserve import hop_trace, wire
from tpserve.errors import PEER_LOSS, EngineBusyError, EngineDeadError, WorkerStartupError
from tpserve.proxy.launcher import WorkerProcess
from tpserve.proxy.streams import RequestStream
from tpserve.shutdown_trace import trace

POLL_MS = 100
HELLO_S = 0.5  # the handshake sends Hello this often until rank 0 answers
SEND_WAIT_S = 1.0  # the most a send waits for room in the socket's queue (rank 0 not reading)
SEND_RETRY_S = 0.005  # how often a waiting send tries again, holding no lock meanwhile
ABORT_GIVE_UP_S = 10.0  # an abort unsent this long ends its stream here (still retried for the engine)


class EngineClient:
    """One proxy's session with rank 0 (see ``wire``): a random nonce names it, both directions number
    their frames, and only frames of this session, signed, in order, count as the engine's."""

    def __init__(self, conn: wire.ConnectionInfo, bind: bool, workers: WorkerProcess | None,
                 silence_timeout: float = 4.0) -> None:
        self.codec = wire.Codec(conn.key)
        self.session = wire.new_nonce()
        self.ctx, self.push, self.pull, self.conn = wire.open_sockets(
            conn, bind, proxy_side=True, send_timeout_ms=1000, session=self.session
        )
        self.workers = workers
        self.silence_timeout = silence_timeout
        self.streams: dict[int, RequestStream] = {}
        self.lock = threading.Lock()  # guards ``streams`` and ``unsent_aborts``; never held across a send
        self.send_lock = threading.Lock()  # the push socket and its sequence number; held for one try only
        self.sent = 0  # sequence number of the last frame sent
        self.unsent_aborts: dict[int, float] = {}  # request id -> when its abort first failed to go out
        self.engine: bytes | None = None  # rank 0's nonce, from its first frame to this session
        self.inbound = wire.SeqCheck()
        self.foreign = 0  # signed frames of another session or engine, ignored
        self.unrouted = 0  # deltas of requests this client has no stream for (ended here, or never sent)
        self.dead: str | None = None
        self.goodbye = threading.Event()
        self.stop = threading.Event()
        self.stats: dict = {}
        self._dispatcher: threading.Thread | None = None

    # -- start -------------------------------------------------------------------------------------------

    def handshake(self, timeout: float) -> dict:
        """Sends HELLO until rank 0 answers READY (or a start-up error, a refusal, or mpirun exits); bounded."""
        deadline = time.monotonic() + timeout
        next_hello = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() >= next_hello:
                self.send(wire.Hello(os.getpid()))
                next_hello = time.monotonic() + HELLO_S
            if self.pull.poll(POLL_MS):
                msg = self._receive()
                if isinstance(msg, wire.Ready):
                    return msg.info
                if isinstance(msg, wire.StartupError):
                    raise WorkerStartupError(msg.message, msg.traceback)
                if isinstance(msg, wire.Refused):
                    raise EngineBusyError(f"the engine refused this client: {msg.reason}")
                if self.dead is not None:
                    raise WorkerStartupError(self.dead)
            elif self.workers is not None and self.workers.poll() is not None:
                if self.workers.relaunch_if_listener_failed():
                    continue
                twice = " (mpirun was launched twice)" if self.workers.launches > 1 else ""
                raise WorkerStartupError(
                    f"the workers exited with code {self.workers.poll()} before they were ready{twice}:\n"
                    + self.workers.log_tail()
                )
        raise WorkerStartupError(f"the workers were not ready within {timeout:.0f} s")

    def start_dispatcher(self) -> None:
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="tpserve-dispatch", daemon=True)
        self._dispatcher.start()

    # -- send --------------------------------------------------------------------------------------------

    def send(self, msg: wire.Message, timeout: float = SEND_WAIT_S) -> bool:
        """Numbers and sends one frame, waiting up to ``timeout`` for room; a frame that could not be queued
        does not use its number. Each try is non-blocking under ``send_lock`` and the wait between tries
        holds no lock, so a full queue (rank 0 stopped or busy) stalls this caller alone, never the dispatch
        thread or the other streams' callers."""
        deadline = time.monotonic() + timeout
        while True:
            with self.send_lock:
                try:
                    self.push.send_multipart(self.codec.encode(msg, self.session, self.sent + 1), zmq.DONTWAIT)
                    self.sent += 1
                    return True
                except zmq.Again:
                    pass
                except zmq.ZMQError:
                    return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(SEND_RETRY_S)

    def abort(self, request_id: int) -> None:
        """Asks rank 0 to end a request. An abort that cannot go out now is retried by the dispatch thread;
        it concerns that request alone, so it never marks the engine dead."""
        if not self.send(wire.Abort(request_id), timeout=0):
            with self.lock:
                self.unsent_aborts.setdefault(request_id, time.monotonic())
            trace("proxy", "abort_unsent", request_id=request_id)

    def _retry_aborts(self) -> None:
        """Sends the aborts that could not go out (the dispatch thread, each pass). One that stays unsent
        past ``ABORT_GIVE_UP_S`` ends its stream here, with the reason, and is still retried."""
        with self.lock:
            if not self.unsent_aborts:
                return
            waiting = dict(self.unsent_aborts)
        now = time.monotonic()
        for rid, since in waiting.items():
            with self.lock:
                stream = self.streams.get(rid)
            if self.send(wire.Abort(rid), timeout=0):
                with self.lock:
                    self.unsent_aborts.pop(rid, None)
            elif stream is not None and now - since > ABORT_GIVE_UP_S:
                with self.lock:
                    self.streams.pop(rid, None)
                stream.fail("abort", f"the abort could not be sent to the engine for {ABORT_GIVE_UP_S:g} s: "
                                     "ended here (the engine is told as soon as it reads again)")

    def submit(self, stream: RequestStream, msg: wire.Submit) -> None:
        with self.lock:
            if self.dead is not None:
                raise EngineDeadError(self.dead)
            self.streams[msg.request_id] = stream
        if not self.send(msg):
            with self.lock:
                self.streams.pop(msg.request_id, None)
            raise EngineDeadError("could not send the request to the workers")

    # -- receive -----------------------------------------------------------------------------------------

    def _receive(self) -> wire.Message | None:
        """The next frame's message if it is this session's, signed and next in sequence; else None.
        A gap means frames were lost: the engine is declared dead, since their requests would hang."""
        frame = self.codec.decode(self.pull.recv_multipart())
        if frame is None:
            return None
        if frame.session != self.session or not frame.engine or self.engine not in (None, frame.engine):
            self.foreign += 1
            return None
        skipped = self.inbound.take(frame.seq)
        if skipped < 0:
            return None
        self.engine = frame.engine
        if skipped:
            self.mark_dead(f"{skipped} frame(s) from the engine were lost (frame {frame.seq - skipped - 1}, "
                           f"then {frame.seq})")
        if frame.msg is None:
            self.mark_dead(f"the engine sent a malformed frame: {frame.error}")
        return frame.msg

    # -- dispatch ----------------------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        """Cannot die silently: whatever it raises fails every pending stream with the reason."""
        try:
            self._dispatch()
        except Exception as e:  # noqa: BLE001 - every stream is told, then the thread ends
            self.mark_dead(f"the proxy's dispatch thread failed: {type(e).__name__}: {e}")
        trace("proxy", "dispatcher_exit")

    def _dispatch(self) -> None:
        last_heard = time.monotonic()
        next_heartbeat = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= next_heartbeat and not self.goodbye.is_set():
                self.send(wire.Heartbeat(time.time()), timeout=0)  # one try: a dropped heartbeat uses no number
                next_heartbeat = now + wire.HEARTBEAT_S
            self._retry_aborts()
            if self.pull.poll(POLL_MS):
                woke = time.time()
                msg = self._receive()
                if msg is not None:
                    last_heard = time.monotonic()  # only this session's frames, signed and in order
                if isinstance(msg, wire.Outputs):
                    if hop_trace.ENABLED:
                        _stamp_firsts(msg.deltas, "p_woke", woke)
                    self._route(msg.deltas)
                    if hop_trace.ENABLED:
                        _stamp_firsts(msg.deltas, "p_routed")
                    if msg.stats:
                        self.stats = msg.stats
                elif isinstance(msg, wire.EngineDead):
                    self.mark_dead(self._engine_dead_reason(msg))
                elif isinstance(msg, wire.Goodbye):
                    trace("proxy", "goodbye_received", reason=msg.reason)
                    self.goodbye.set()
            if self.dead is None:
                code = self.workers.poll() if self.workers is not None else None
                if code is not None:
                    self.mark_dead(describe_exit(code, self.workers.log_tail()))
                elif self.workers is None and time.monotonic() - last_heard > self.silence_timeout:
                    self.mark_dead(f"no word from the workers for {self.silence_timeout:.0f} s")

    def _engine_dead_reason(self, msg: wire.EngineDead) -> str:
        """Rank 0's error is often only the echo of another rank's death (a broken collective): give
        mpirun a moment to say which rank died and how, and report both."""
        reported = f"the executor failed on {msg.message}"
        if self.workers is None:
            return reported
        deadline = time.monotonic() + 3.0
        while self.workers.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        code = self.workers.poll()
        return reported if code is None else f"{describe_exit(code, self.workers.log_tail())}\n{reported}"

    def _route(self, deltas: list[dict]) -> None:
        """Feeds each delta to its stream. What one request's data makes fail on this side (its
        detokenizing, say) ends that request alone, with the error, and the engine is told to abort it."""
        received = time.time()
        for delta in deltas:
            rid = delta["request_id"]
            with self.lock:
                stream = self.streams.get(rid)
                if stream is not None and delta["finished"]:
                    del self.streams[rid]
            if stream is None:
                self.unrouted += 1
                continue
            try:
                stream.on_delta(delta, received)
            except Exception as e:  # noqa: BLE001 - that request ends with the error, the rest carry on
                with self.lock:
                    self.streams.pop(rid, None)
                stream.fail("error", f"the proxy could not handle the request's output: {type(e).__name__}: {e}")
                if not delta["finished"]:
                    self.abort(rid)

    def mark_dead(self, reason: str) -> None:
        """Refuses new requests and fails every pending one with ``reason``."""
        with self.lock:
            if self.dead is not None:
                return
            self.dead = reason
            pending, self.streams = list(self.streams.values()), {}
        trace("proxy", "engine_dead", reason=reason.splitlines()[0] if reason else "", pending=len(pending))
        for stream in pending:
            stream.fail("error", f"EngineDeadError: {reason}")

    def pending(self) -> list[RequestStream]:
        with self.lock:
            return list(self.streams.values())

    def close(self, timeout: float = 5.0) -> None:
        """Stops the dispatch thread (bounded), then closes the sockets before the context."""
        self.stop.set()
        if self._dispatcher is not None:
            self._dispatcher.join(timeout)
            trace("proxy", "dispatcher_joined", alive=self._dispatcher.is_alive())
        self.push.close(linger=0)
        self.pull.close(linger=0)
        self.ctx.term()
        trace("proxy", "sockets_closed", dropped_frames=self.codec.dropped, old_frames=self.inbound.old,
              foreign_frames=self.foreign, unrouted=self.unrouted)


def _stamp_firsts(deltas: list[dict], hop: str, t: float | None = None) -> None:
    """Hop stamps of the deltas that carry a first token (their metrics have its publish time)."""
    for d in deltas:
        if "first_token_published" in d["metrics"]:
            hop_trace.stamp(d["request_id"], hop, t)


RANK_DIED = re.compile(
    r"process rank (\d+) with PID (\d+) on node (\S+) exited on\s+signal (\d+) \(([^)]*)\)"
    r"|process rank (\d+) with PID (\d+) on node (\S+) exited on\s+signal (\d+)"
)
RANK_FAILED = re.compile(r"tpserve worker rank (\d+): (.+)")


def describe_exit(code: int, log_tail: str) -> str:
    """Which rank died and how, from mpirun's exit code and its report (Open MPI 4 and 5 word it alike)."""
    flat = " ".join(log_tail.split())
    m = RANK_DIED.search(flat)
    if m:
        rank, pid, node, sig, name = m.group(1, 2, 3, 4, 5) if m.group(1) else (*m.group(6, 7, 8, 9), "")
        return f"worker rank {rank} (pid {pid} on {node}) was killed by signal {sig} {name}".rstrip()
    failed = RANK_FAILED.findall(log_tail)
    if failed:  # the rank whose error is its own, not the echo of losing a peer
        rank, error = next((f for f in failed if not PEER_LOSS.search(f[1])), failed[0])
        return f"worker rank {rank} failed: {error}"
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    return f"the workers died (mpirun {how}):\n{log_tail[-1500:]}"

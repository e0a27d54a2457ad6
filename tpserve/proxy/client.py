"""The proxy's ZeroMQ side: sockets, the handshake, sending, and the dispatch thread that routes rank 0's
responses to request streams and watches the workers' liveness."""

from __future__ import annotations

import os
import re
import threading
import time

import zmq

from tpserve import wire
from tpserve.errors import EngineDeadError, WorkerStartupError
from tpserve.proxy.launcher import WorkerProcess
from tpserve.proxy.streams import RequestStream
from tpserve.shutdown_trace import trace

POLL_MS = 100


class EngineClient:
    def __init__(self, conn: wire.ConnectionInfo, bind: bool, workers: WorkerProcess | None,
                 silence_timeout: float = 4.0) -> None:
        self.codec = wire.Codec(conn.key)
        self.ctx, self.push, self.pull, self.conn = wire.open_sockets(conn, bind, proxy_side=True, send_timeout_ms=1000)
        self.workers = workers
        self.silence_timeout = silence_timeout
        self.streams: dict[int, RequestStream] = {}
        self.lock = threading.Lock()  # guards the push socket and ``streams``
        self.dead: str | None = None
        self.goodbye = threading.Event()
        self.stop = threading.Event()
        self.stats: dict = {}
        self._dispatcher: threading.Thread | None = None

    # -- start -------------------------------------------------------------------------------------------

    def handshake(self, timeout: float) -> dict:
        """Sends HELLO until rank 0 answers READY (or a start-up error, or mpirun exits); bounded."""
        deadline = time.monotonic() + timeout
        next_hello = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() >= next_hello:
                self.send(wire.Hello(os.getpid()))
                next_hello = time.monotonic() + 1.0
            if self.pull.poll(POLL_MS):
                msg = self.codec.decode(self.pull.recv_multipart())
                if isinstance(msg, wire.Ready):
                    return msg.info
                if isinstance(msg, wire.StartupError):
                    raise WorkerStartupError(msg.message, msg.traceback)
            elif self.workers is not None and self.workers.poll() is not None:
                raise WorkerStartupError(
                    f"the workers exited with code {self.workers.poll()} before they were ready:\n"
                    + self.workers.log_tail()
                )
        raise WorkerStartupError(f"the workers were not ready within {timeout:.0f} s")

    def start_dispatcher(self) -> None:
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="tpserve-dispatch", daemon=True)
        self._dispatcher.start()

    # -- send --------------------------------------------------------------------------------------------

    def send(self, msg: wire.Message) -> bool:
        frames = self.codec.encode(msg)
        with self.lock:
            try:
                self.push.send_multipart(frames)
                return True
            except (zmq.Again, zmq.ZMQError):
                return False

    def submit(self, stream: RequestStream, msg: wire.Submit) -> None:
        with self.lock:
            if self.dead is not None:
                raise EngineDeadError(self.dead)
            self.streams[msg.request_id] = stream
        if not self.send(msg):
            with self.lock:
                self.streams.pop(msg.request_id, None)
            raise EngineDeadError("could not send the request to the workers")

    # -- dispatch ----------------------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        last_heard = time.monotonic()
        next_heartbeat = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= next_heartbeat and not self.goodbye.is_set():
                self.send(wire.Heartbeat(time.time()))
                next_heartbeat = now + wire.HEARTBEAT_S
            if self.pull.poll(POLL_MS):
                msg = self.codec.decode(self.pull.recv_multipart())
                last_heard = time.monotonic()
                if isinstance(msg, wire.Outputs):
                    self._route(msg.deltas)
                    if msg.stats:
                        self.stats = msg.stats
                elif isinstance(msg, wire.EngineDead):
                    self.mark_dead(self._engine_dead_reason(msg))
                elif isinstance(msg, wire.Goodbye):
                    trace("proxy", "goodbye_received", reason=msg.reason)
                    self.goodbye.set()
                continue
            if self.dead is None:
                code = self.workers.poll() if self.workers is not None else None
                if code is not None:
                    self.mark_dead(describe_exit(code, self.workers.log_tail()))
                elif self.workers is None and time.monotonic() - last_heard > self.silence_timeout:
                    self.mark_dead(f"no word from the workers for {self.silence_timeout:.0f} s")
        trace("proxy", "dispatcher_exit")

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
        received = time.time()
        for delta in deltas:
            rid = delta.get("request_id")
            with self.lock:
                stream = self.streams.get(rid)
                if stream is not None and delta.get("finished"):
                    del self.streams[rid]
            if stream is not None:
                stream.on_delta(delta, received)

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
        trace("proxy", "sockets_closed", dropped_frames=self.codec.dropped)


RANK_DIED = re.compile(
    r"process rank (\d+) with PID (\d+) on node (\S+) exited on\s+signal (\d+) \(([^)]*)\)"
    r"|process rank (\d+) with PID (\d+) on node (\S+) exited on\s+signal (\d+)"
)
RANK_FAILED = re.compile(r"tpserve worker rank (\d+): (.+)")
PEER_LOSS = re.compile(r"gloo|nccl|connection (reset|closed)|by peer", re.IGNORECASE)


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

"""Rank 0's two socket threads beside the executor loop: intake (ZMQ -> request queue) and sender
(responses -> ZMQ). Each socket belongs to one thread, as ZeroMQ requires."""

from __future__ import annotations

import queue
import threading
import time

import zmq

from tpserve import wire
from tpserve.executor.request_queue import RequestQueue
from tpserve.shutdown_trace import Watchdog, phase_timer, trace

POLL_MS = 100
SEND_TIMEOUT_MS = 2000


class Rank0IO:
    def __init__(self, conn: wire.ConnectionInfo, bind: bool, heartbeat_timeout: float) -> None:
        self.codec = wire.Codec(conn.key)
        self.ctx, self.push, self.pull, self.conn = wire.open_sockets(
            conn, bind, proxy_side=False, send_timeout_ms=SEND_TIMEOUT_MS
        )
        self.heartbeat_timeout = heartbeat_timeout
        self.outbox: queue.Queue[wire.Message | None] = queue.Queue()
        self.ready: wire.Ready | None = None
        self.stop_intake = threading.Event()
        self.proxy_lost = False
        self.exit_watch: Watchdog | None = None
        self.sent_dropped = 0
        self._sender = threading.Thread(target=self._send_loop, name="rank0-sender", daemon=True)
        self._sender.start()
        self._intake: threading.Thread | None = None

    def send(self, msg: wire.Message) -> None:
        self.outbox.put(msg)

    def start_intake(self, requests: RequestQueue, ready: wire.Ready) -> None:
        self.ready = ready
        self._intake = threading.Thread(target=self._intake_loop, args=(requests,), name="rank0-intake", daemon=True)
        self._intake.start()

    def _intake_loop(self, requests: RequestQueue) -> None:
        """Runs until ``close``: after the sentinel it keeps answering (heartbeats) while the ranks end."""
        last_seen: float | None = None
        next_heartbeat = 0.0
        ending = False
        while not self.stop_intake.is_set():
            if time.monotonic() >= next_heartbeat:  # so an attached proxy can tell silence from death
                self.send(wire.Heartbeat(time.time()))
                next_heartbeat = time.monotonic() + wire.HEARTBEAT_S
            if self.pull.poll(POLL_MS):
                msg = self.codec.decode(self.pull.recv_multipart())
                if msg is None:
                    continue
                last_seen = time.monotonic()
                if isinstance(msg, wire.Hello):
                    self.send(self.ready)
                elif isinstance(msg, (wire.Submit, wire.Abort)):
                    if isinstance(msg, wire.Submit):
                        msg.rank0_time = time.time()
                    requests.put(msg)  # after the sentinel the executor aborts late submits
                elif isinstance(msg, wire.Shutdown) and not ending:
                    ending = True
                    trace("worker", "sentinel_received", drain=msg.drain)
                    # From here every rank should be out within the timeout; if not, the stacks of
                    # this process (its loop thread wedged in a collective, say) go into the trace.
                    self.exit_watch = phase_timer("worker", "sentinel_to_exit").start()
                    requests.put(msg)
                    trace("request_queue", "shutdown_enqueued")
            elif not ending and last_seen is not None and time.monotonic() - last_seen > self.heartbeat_timeout:
                ending = self.proxy_lost = True
                trace("worker", "proxy_lost", silent_s=round(time.monotonic() - last_seen, 3))
                requests.put(wire.Shutdown(drain=False))
                trace("request_queue", "shutdown_enqueued", reason="proxy_lost")

    def _send_loop(self) -> None:
        while True:
            msg = self.outbox.get()
            if msg is None:
                return
            try:
                self.push.send_multipart(self.codec.encode(msg))
            except zmq.Again:
                self.sent_dropped += 1  # the proxy is gone; the heartbeat check ends the workers

    def close(self, timeout: float = 5.0) -> None:
        """Flushes the outbox (bounded), stops both threads, closes sockets before the context."""
        self.stop_intake.set()
        self.outbox.put(None)
        self._sender.join(timeout)
        if self._intake is not None:
            self._intake.join(timeout)
        self.pull.close(linger=0)
        # A live proxy takes what is queued at once; a lost one never will, so do not wait for it.
        self.push.close(linger=0 if self.proxy_lost or self._sender.is_alive() else 1000)
        self.ctx.term()
        trace("worker", "sockets_closed", dropped_frames=self.codec.dropped, unsent=self.sent_dropped)

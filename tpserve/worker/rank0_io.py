"""Rank 0's two socket threads beside the executor loop: intake (ZMQ -> request queue) and sender
(responses -> ZMQ; the loop thread sends small responses itself, see ``Rank0IO.send``). One thread at a
time uses a socket, under a lock, as ZeroMQ requires.

The intake is the engine's border: every frame is checked (tag, envelope, session, sequence number,
every field of its kind) before anything reaches the queue that rank 0 broadcasts to every rank, so no
frame can stop the engine. One proxy at a time holds a session (see ``wire``); another proxy's Hello is
refused while that session is live. The sender never drops a frame of the live session: it waits for
the proxy with a bound, and when the bound expires the engine reports itself dead and ends."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import zmq

from tpserve import hop_trace, wire
from tpserve.executor.request_queue import RequestQueue
from tpserve.sampling_params import SamplingParams
from tpserve.shutdown_trace import Watchdog, phase_timer, trace

POLL_MS = 100
SEND_SLICE_MS = 100  # the sender re-checks its session and bound this often while a frame waits
SEND_BOUND_S = float(os.environ.get("TPSERVE_SEND_TIMEOUT", "30"))  # the most a frame waits for the proxy
STARTUP_ERROR_WAIT_S = 2.0  # a start-up error waits this long for a proxy's Hello to answer
DIRECT_MAX_DELTAS = 8  # an Outputs frame with more deltas is encoded and sent by the sender thread
FAIR_FRAMES = 256  # frames read in a row after which silence is judged even with more waiting
PROMPT_IDS_BEFORE_READY = 1 << 16  # a Submit's token ids the intake decodes before it knows max_seq_len


def owner_pidfd() -> int | None:
    """A pidfd of the proxy that spawned this engine, when it runs on this host: it turns readable the
    moment that proxy exits, kill -9 included, so the engine ends at once instead of after the heartbeat
    bound. None in attach mode, on another host, or where pidfds are missing: the heartbeats still tell."""
    spec = os.environ.get(wire.ENV_OWNER)
    if not spec or not hasattr(os, "pidfd_open"):
        return None
    try:
        pid, started = spec.split(":")
        fd = os.pidfd_open(int(pid))
    except (ValueError, OSError):
        return None
    try:  # the fd pins one process: check it is the proxy, not another host's pid or a reused one
        if abs(psutil.Process(int(pid)).create_time() - float(started)) < 0.05:
            return fd
    except (ValueError, psutil.Error):
        pass
    os.close(fd)
    return None


@dataclass
class Session:
    """The one proxy being served: its nonce (also its routing id) and both directions' sequence."""

    nonce: bytes
    last_heard: float
    inbound: wire.SeqCheck = field(default_factory=wire.SeqCheck)
    sent: int = 0  # sequence number of the last frame sent to it
    waiting: bool = False  # its Hello came before READY (or the start-up error) existed: answered when it does
    silent: bool = False  # traced as silent while its pidfd says it lives (reset when it is heard again)


class Rank0IO:
    def __init__(self, conn: wire.ConnectionInfo, bind: bool, heartbeat_timeout: float,
                 send_bound: float = SEND_BOUND_S) -> None:
        self.codec = wire.Codec(conn.key)
        self.ctx, self.out, self.inp, self.conn = wire.open_sockets(
            conn, bind, proxy_side=False, send_timeout_ms=SEND_SLICE_MS
        )
        self.engine = wire.new_nonce()
        self.attach = bind  # attach mode: the engine outlives its proxies; spawned: it ends with its proxy
        self.heartbeat_timeout = heartbeat_timeout
        self.send_bound = send_bound
        self.outbox: queue.Queue[tuple[bytes | None, wire.Message] | None] = queue.Queue()
        # Frames leave in the order they are given: the loop thread sends at once only when nothing is
        # queued before its frame (``queued``, under ``order_lock``); one thread at a time uses the socket.
        self.order_lock = threading.Lock()
        self.socket_lock = threading.Lock()
        self.queued = 0
        self.lock = threading.Lock()  # guards the session and ``open_ids`` between the two threads
        self.session: Session | None = None
        self.ended: set[bytes] = set()  # nonces of sessions that are over: never opened again (replays)
        # Requests taken in and not finished, and the session that submitted each: their outputs go to that
        # session only, and they are aborted when it ends. A new session opens only once this is empty.
        self.open_ids: dict[int, bytes] = {}
        self.answer: wire.Ready | wire.StartupError | None = None
        self.answered = threading.Event()
        self.requests: RequestQueue | None = None
        # A body's bounds: only a Submit may be large, and its token ids no more than the engine can hold.
        self.limits = wire.BodyLimits(array=PROMPT_IDS_BEFORE_READY, intake=True)
        self.stats: Callable[[], dict[str, Any]] | None = None  # the executor's load, sent with every READY
        self.ending = False  # the sentinel is on its way: no new session, no silence check
        self.dead: str | None = None  # a frame could not be delivered within the bound
        self.stop_intake = threading.Event()
        self.stop_sending = threading.Event()
        self.proxy_lost = False
        self.exit_watch: Watchdog | None = None
        self.frame_time = 0.0  # when the intake took the frame it is handling (hop_trace)
        self.poller = zmq.Poller()
        self.poller.register(self.inp, zmq.POLLIN)
        self.owner = None if bind else owner_pidfd()
        if self.owner is not None:
            self.poller.register(self.owner, zmq.POLLIN)
        self.counts = dict.fromkeys(("old_frames", "gaps", "rejected", "error_replies", "foreign", "refused",
                                     "unsent", "sent_at_once", "duplicates", "orphan_deltas"), 0)
        self._sender = threading.Thread(target=self._send_loop, name="rank0-sender", daemon=True)
        self._sender.start()
        self._intake = threading.Thread(target=self._intake_loop, name="rank0-intake", daemon=True)
        self._intake.start()

    # -- the executor's side -----------------------------------------------------------------------------

    def send(self, msg: wire.Message) -> None:
        """To the proxy of the live session. READY and a start-up error are the answer to every Hello.

        Called by the loop thread. A small frame (a first token, a few streams' chunks) goes out from here
        at once when nothing waits in the outbox: it reaches the proxy without waking the sender thread,
        which would first wait for the GIL while the loop runs on. A large frame (a busy step's, many
        deltas) is encoded by the sender thread, while the loop waits on the device; so is every frame
        while the proxy is not taking them (the sender waits for it, bounded)."""
        if isinstance(msg, (wire.Ready, wire.StartupError)):
            self._set_answer(msg)
            return
        with self.lock:  # the destination is bound now: a session that opens later never gets this frame
            s = self.session
            if isinstance(msg, wire.Outputs):
                msg = self._own_outputs(msg, s)
        if msg is None:
            return  # nothing of this session's in it
        if s is None:
            self.counts["unsent"] += 1
            return
        small = not isinstance(msg, wire.Outputs) or len(msg.deltas) <= DIRECT_MAX_DELTAS
        with self.order_lock:
            if small and self.queued == 0 and self._send_now(msg, s):
                return
            self.queued += 1
            self.outbox.put((s.nonce, msg))

    def _own_outputs(self, msg: wire.Outputs, s: Session | None) -> wire.Outputs | None:
        """Under the lock: the deltas of ``msg`` that belong to session ``s`` (None: nothing to send), and
        the finished requests forgotten. A delta of another session's request (one that ended and is being
        aborted) is dropped: an output reaches only the session that submitted its request."""
        own = []
        for d in msg.deltas:
            owner = self.open_ids.get(d["request_id"])
            if d["finished"]:
                self.open_ids.pop(d["request_id"], None)
            if s is not None and owner == s.nonce:
                own.append(d)
            else:
                self.counts["orphan_deltas"] += 1
        if len(own) == len(msg.deltas):
            return msg
        return wire.Outputs(own, msg.stats) if own or msg.stats else None

    def _send_now(self, msg: wire.Message, s: Session) -> bool:
        """Under ``order_lock`` with nothing queued: one try without waiting. False: nothing was sent."""
        if self.session is not s or self.dead is not None:
            return False
        frames = [s.nonce, *self.codec.encode(msg, s.nonce, s.sent + 1, self.engine)]
        with self.socket_lock:
            try:
                self.out.send_multipart(frames, zmq.DONTWAIT)
            except zmq.ZMQError:
                return False
        s.sent += 1
        self.counts["sent_at_once"] += 1
        if hop_trace.ENABLED:
            _stamp_firsts(msg, "r_sent")
        return True

    def _enqueue(self, dest: bytes | None, msg: wire.Message) -> None:
        """For the sender thread, after every frame given before it."""
        with self.order_lock:
            self.queued += 1
            self.outbox.put((dest, msg))

    def start_intake(self, requests: RequestQueue, ready: wire.Ready) -> None:
        """From here the intake feeds the executor's queue, and Hellos are answered with ``ready``."""
        max_seq_len = ready.info.get("max_seq_len")
        if isinstance(max_seq_len, int) and max_seq_len > 0:
            self.limits = wire.BodyLimits(array=max_seq_len, intake=True)
        with self.lock:
            self.requests = requests
            lost = self.proxy_lost
        if lost:
            requests.put(wire.Shutdown(drain=False))
        self._set_answer(ready)

    def _set_answer(self, msg: wire.Ready | wire.StartupError) -> None:
        with self.lock:
            self.answer = msg
            s = self.session
            if s is not None and s.waiting:  # a Hello not handled yet is answered by its own handling
                s.waiting = False
                self._enqueue(s.nonce, self._with_stats(msg))
                self.answered.set()

    def _with_stats(self, answer: wire.Ready | wire.StartupError) -> wire.Ready | wire.StartupError:
        """READY with the engine's load now, so a client's ``stats()`` has every key before any output."""
        if not isinstance(answer, wire.Ready) or self.stats is None:
            return answer
        try:
            return wire.Ready({**answer.info, "stats": self.stats()})
        except Exception as e:  # noqa: BLE001 - a racy read must not cost the answer
            trace("worker", "stats_error", error=f"{type(e).__name__}: {e}")
            return answer

    # -- intake ------------------------------------------------------------------------------------------

    def _intake_loop(self) -> None:
        """Runs until ``close``. Rank 0's heartbeats come from the sender thread, so no frame the intake
        decodes can hold them up; and a session is judged silent only when the socket has nothing waiting
        (frames queued behind a slow one may be its heartbeats), or after ``FAIR_FRAMES`` frames in a row:
        ZeroMQ takes turns among its peers, so a flood of other clients' frames cannot hide a dead one."""
        in_a_row = 0
        while not self.stop_intake.is_set():
            s = self.session
            ready = dict(self.poller.poll(POLL_MS))
            if self.owner is not None and self.owner in ready:
                self._owner_exited()
            if self.inp in ready:
                in_a_row += 1
                frames = self.inp.recv_multipart()
                self.frame_time = time.time()
                try:
                    self._on_frames(frames)
                except Exception as e:  # noqa: BLE001 - one frame must not stop the intake
                    self.counts["rejected"] += 1
                    trace("worker", "intake_error", error=f"{type(e).__name__}: {e}")
            else:
                in_a_row = 0
            if (s is not None and not self.ending and (in_a_row == 0 or in_a_row > FAIR_FRAMES)
                    and time.monotonic() - s.last_heard > self.heartbeat_timeout):
                self._silent(s)

    def _silent(self, s: Session) -> None:
        """The live proxy has not been heard for the bound. With a pidfd on it (spawned, same host) silence
        proves nothing: a debugger, SIGSTOP or a VM pause stops a live proxy, and only its exit (the pidfd)
        ends the engine; the engine runs on and its frames wait (bounded by ``send_bound``). Otherwise
        silence is all there is to tell a dead proxy by."""
        if self.owner is None:
            self._session_silent(s)
        elif not s.silent:
            s.silent = True
            trace("worker", "proxy_silent", silent_s=round(time.monotonic() - s.last_heard, 3), owner_alive=True)

    def _owner_exited(self) -> None:
        """The spawning proxy is gone (its pidfd turned readable): end as on its silence, without the wait."""
        self.poller.unregister(self.owner)
        os.close(self.owner)
        self.owner = None
        s = self.session
        trace("worker", "owner_exited", session=s is not None)
        if s is not None and not self.ending:
            self._session_silent(s)

    def _on_frames(self, frames: list[bytes]) -> None:
        """The envelope first: a frame of no live session is dropped with its body unread (a Hello's body is
        small by its bounds), and a body is decoded within its kind's bounds only once its session and
        sequence number pass, so no frame costs the intake more than a bounded decode."""
        env = self.codec.envelope(frames)
        if env is None:
            return  # a bad tag or envelope: counted by the codec
        s = self.session
        if s is not None and env.session == s.nonce:
            skipped = s.inbound.take(env.seq)
            if skipped < 0:
                return  # replayed or old: counted
            if skipped:
                trace("worker", "frames_lost", direction="to_rank0", skipped=skipped, seq=env.seq)
            s.last_heard = time.monotonic()  # only frames that pass the tag and the sequence are signs of life
            s.silent = False
            self._handle(s, self.codec.body(env, self.limits))
        elif env.kind == wire.Hello.KIND:
            frame = self.codec.body(env, self.limits)
            if isinstance(frame.msg, wire.Hello):
                self._hello_from_new(frame)
            else:
                self.counts["foreign"] += 1
        else:
            self.counts["foreign"] += 1  # another session's frame, or one of a session that is over: unread

    def _hello_from_new(self, frame: wire.Frame) -> None:
        if frame.session in self.ended:
            self.counts["foreign"] += 1  # a replayed Hello of a session that is over
            return
        with self.lock:
            if self.session is not None or self.ending:
                why = ("the engine is shutting down" if self.ending else
                       "another client is attached to this engine (one at a time): it must shut down or "
                       f"fall silent for {self.heartbeat_timeout:g} s first")
                self.counts["refused"] += 1
                self._enqueue(frame.session, wire.Refused(why))
                return
            if self.open_ids:
                return  # the last proxy's requests are still being aborted; its Hello is sent again
            s = self.session = Session(frame.session, time.monotonic())
            s.inbound.take(frame.seq)
        trace("worker", "session_opened", proxy_pid=frame.msg.proxy_pid)
        self._handle(s, frame)

    def _session_silent(self, s: Session) -> None:
        """The proxy went quiet. Spawned: it was the engine's owner, so the engine ends. Attached: its
        requests are aborted and another proxy may attach."""
        trace("worker", "proxy_lost", silent_s=round(time.monotonic() - s.last_heard, 3), attach=self.attach)
        with self.lock:
            self._end(s)
            requests, open_ids = self.requests, sorted(r for r, owner in self.open_ids.items() if owner == s.nonce)
            if not self.attach:
                self.ending = self.proxy_lost = True
        if not self.attach:
            if requests is not None:
                requests.put(wire.Shutdown(drain=False))
                trace("request_queue", "shutdown_enqueued", reason="proxy_lost")
        elif requests is not None:
            for rid in open_ids:
                requests.put(wire.Abort(rid))
            trace("worker", "session_closed", aborted=len(open_ids))

    def _end(self, s: Session) -> None:
        """Under the lock: the session is over, for good (its nonce never opens one again)."""
        self.session = None
        self.ended.add(s.nonce)
        self.counts["old_frames"] += s.inbound.old
        self.counts["gaps"] += s.inbound.gaps

    def _handle(self, s: Session, frame: wire.Frame) -> None:
        msg = frame.msg
        if isinstance(msg, wire.Submit):
            try:
                params = SamplingParams.from_dict(msg.params).to_dict()
            except (ValueError, TypeError, OverflowError, RecursionError) as e:
                frame.error, frame.request_id, msg = f"Submit.params: {e}", msg.request_id, None
        if msg is None:
            self.counts["rejected"] += 1
            if frame.request_id is not None:
                self._reply_error(s, frame.request_id, frame.error)
        elif isinstance(msg, wire.Hello):
            with self.lock:  # each Hello is answered once: here, or by ``_set_answer`` when READY comes
                answer = self.answer
                s.waiting = answer is None
            if answer is not None:
                self._enqueue(s.nonce, self._with_stats(answer))
                self.answered.set()
        elif isinstance(msg, wire.Submit):
            if self.requests is None:
                self._reply_error(s, msg.request_id, "the engine is not ready yet")
                return
            with self.lock:
                owner = self.open_ids.get(msg.request_id)
                if owner is None:
                    self.open_ids[msg.request_id] = s.nonce
            if owner is not None:  # refused alone: the request of that id runs on, and stays tracked
                self.counts["duplicates"] += 1
                self._reply_error(s, msg.request_id, f"duplicate request id {msg.request_id}: a request of that "
                                                     "id is still running")
                return
            if hop_trace.ENABLED:
                hop_trace.stamp(msg.request_id, "r_recv", self.frame_time)
            self.requests.put(wire.Submit(msg.request_id, msg.prompt_token_ids, params, msg.stream,
                                          msg.arrival_time, time.time()))
        elif isinstance(msg, wire.Abort):
            if self.requests is not None:
                self.requests.put(msg)
        elif isinstance(msg, wire.Shutdown):
            if not self.ending and self.requests is not None:
                self.ending = True
                trace("worker", "sentinel_received", drain=msg.drain)
                # From here every rank should be out within the timeout; if not, the stacks of
                # this process (its loop thread wedged in a collective, say) go into the trace.
                self.exit_watch = phase_timer("worker", "sentinel_to_exit").start()
                self.requests.put(msg)
                trace("request_queue", "shutdown_enqueued")
        elif not isinstance(msg, wire.Heartbeat):
            self.counts["rejected"] += 1  # a kind that only rank 0 sends

    def _reply_error(self, s: Session, request_id: int, why: str) -> None:
        self.counts["error_replies"] += 1
        self._enqueue(s.nonce, wire.Outputs([wire.error_delta(request_id, why)]))

    # -- sender ------------------------------------------------------------------------------------------

    def _send_loop(self) -> None:
        """Sends what is queued, in order; when nothing has been queued for a heartbeat's interval, queues a
        heartbeat to the live session (so the proxy can tell silence from death, whatever the intake does)."""
        while True:
            try:
                item = self.outbox.get(timeout=wire.HEARTBEAT_S)
            except queue.Empty:
                s = self.session
                if s is not None and self.dead is None:
                    self._enqueue(s.nonce, wire.Heartbeat(time.time()))
                continue
            if item is None:
                return
            try:
                self._send_one(*item)
            except Exception as e:  # noqa: BLE001 - a frame that cannot be sent is the engine's death
                self._die(f"the sender failed: {type(e).__name__}: {e}")
            finally:
                with self.order_lock:
                    self.queued -= 1

    def _send_one(self, dest: bytes | None, msg: wire.Message) -> None:
        """Sends one outbox item: to the live session (waiting, bounded), or once to another client. (``send``
        already forgot the requests that its Outputs end; intake's error replies end no open request.)"""
        with self.lock:
            s = self.session
        if dest is None:
            dest = s.nonce if s is not None else None
        if self.dead is not None or dest is None:
            self.counts["unsent"] += 1
        elif s is not None and dest == s.nonce:
            self._send_to_session(s, msg)
        else:  # a refusal, or a reply to a session that is over: one try, never a wait
            try:
                with self.socket_lock:
                    self.out.send_multipart([dest, *self.codec.encode(msg, dest, 1, self.engine)], zmq.DONTWAIT)
            except zmq.ZMQError:
                self.counts["unsent"] += 1

    def _send_to_session(self, s: Session, msg: wire.Message) -> None:
        """Waits for the proxy while it is the live session's; past the bound the engine is dead."""
        frames = [s.nonce, *self.codec.encode(msg, s.nonce, s.sent + 1, self.engine)]
        deadline = time.monotonic() + self.send_bound
        while True:
            try:
                with self.socket_lock:
                    self.out.send_multipart(frames)  # waits SEND_SLICE_MS at most
                s.sent += 1
                if hop_trace.ENABLED:
                    _stamp_firsts(msg, "r_sent_by_sender")
                return
            except zmq.ZMQError as e:  # Again: the proxy is not reading; EHOSTUNREACH: not connected
                if self.session is not s or self.stop_sending.is_set():
                    self.counts["unsent"] += 1
                    return
                if time.monotonic() >= deadline:
                    self._die(f"a {msg.KIND} frame could not be delivered to the proxy for {self.send_bound:g} s "
                              f"({e.strerror})")
                    return
                if e.errno == zmq.EHOSTUNREACH:
                    time.sleep(SEND_SLICE_MS / 1000)

    def _die(self, reason: str) -> None:
        """The engine cannot tell its proxy what it computes: report it, and end every rank."""
        self.dead = reason
        self.counts["unsent"] += 1
        trace("worker", "engine_dead", reason=reason)
        with self.lock:
            requests, self.ending = self.requests, True
        if requests is not None:
            requests.put(wire.Shutdown(drain=False))
            trace("request_queue", "shutdown_enqueued", reason="undeliverable")

    def close(self, timeout: float = 5.0) -> None:
        """Flushes the outbox (bounded), stops both threads, closes sockets before the context."""
        if isinstance(self.answer, wire.StartupError) and not self.attach:
            self.answered.wait(STARTUP_ERROR_WAIT_S)  # the spawning proxy's Hello may be a moment away
        self.stop_intake.set()
        self.outbox.put(None)
        self._sender.join(timeout)
        self.stop_sending.set()
        self._sender.join(2 * SEND_SLICE_MS / 1000)
        self._intake.join(timeout)
        if self.owner is not None and not self._intake.is_alive():
            os.close(self.owner)
            self.owner = None
        self.inp.close(linger=0)
        # A live proxy takes what is queued at once; a lost one never will, so do not wait for it.
        self.out.close(linger=0 if self.session is None or self._sender.is_alive() else 1000)
        self.ctx.term()
        with self.lock:
            if self.session is not None:
                self._end(self.session)
        trace("worker", "sockets_closed", dropped_frames=self.codec.dropped, **self.counts)
        hop_trace.dump("rank0")


def _stamp_firsts(msg: wire.Message, hop: str) -> None:
    """Hop stamps of the deltas of ``msg`` that carry a first token (their metrics have its publish time)."""
    if isinstance(msg, wire.Outputs):
        for d in msg.deltas:
            if "first_token_published" in d["metrics"]:
                hop_trace.stamp(d["request_id"], hop)

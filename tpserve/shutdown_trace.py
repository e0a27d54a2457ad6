"""Shutdown tracing that still works where ``logging`` no longer does.

A shutdown that hangs shows up only as a process that never exits, and the places that matter
(atexit handlers, ``__del__`` during interpreter teardown, the line before ``os._exit``) are where
``logging`` is already shut down. So ``trace()`` formats one line and hands it to one raw
``os.write``: no locks, no buffers, and no module global looked up at call time (teardown may have
set them to None). It never raises.

Switching it on (read at every call):

- ``TPSERVE_SHUTDOWN_TRACE_DIR=DIR``: every process appends to ``DIR/<host>.<pid>.log`` (the
  directory is created on first use); a line that cannot go there goes to stderr.
- else ``TPSERVE_SHUTDOWN_TRACE=1``: lines go to stderr (fd 2).
- else ``trace()`` does nothing, so normal runs stay quiet.

The watchdog (``phase_timer``) reads ``TPSERVE_SHUTDOWN_TIMEOUT`` (seconds, default 30; 0 or less
disables it) and ``TPSERVE_SHUTDOWN_WATCHDOG_EXIT=1`` (an overrun ends the process with status 70
even without ``exit_code``). Its overrun report goes to stderr when tracing is off.

Line format: tab-separated, ``\\``, tab, newline and carriage return escaped as ``\\\\ \\t \\n \\r``::

    TPT1  wall  mono  host  pid  rank  tid  thread  component  phase  [key=value ...]

``wall`` is UTC ISO 8601 with microseconds (``2025-01-31T12:00:00.123456Z``), ``mono`` is
``time.monotonic()`` in seconds, ``rank`` comes from ``TPSERVE_RANK``, ``OMPI_COMM_WORLD_RANK``
or ``PMIX_RANK`` (``-`` for the proxy), ``tid`` is the native thread id, values are ``repr()`` s.
Any other line in a trace file is a ``faulthandler`` stack dump; ``trace_view`` attaches it to its
process.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType

MAGIC = "TPT1"
COLUMNS = ("magic", "wall", "mono", "host", "pid", "rank", "tid", "thread", "component", "phase")
ENV_DIR = "TPSERVE_SHUTDOWN_TRACE_DIR"
ENV_STDERR = "TPSERVE_SHUTDOWN_TRACE"
ENV_TIMEOUT = "TPSERVE_SHUTDOWN_TIMEOUT"
ENV_WATCHDOG_EXIT = "TPSERVE_SHUTDOWN_WATCHDOG_EXIT"
WATCHDOG_EXIT_CODE = 70
MAX_VALUE_CHARS = 512
MAX_LINE_BYTES = 4096  # at most PIPE_BUF, so a line written to a pipe stays whole


class _SinkState:
    """The environment as last read (teardown may make ``os.environ`` unreadable) and the trace
    file's fd, cached for the process (``pid``) and directory it was opened for."""

    __slots__ = ("dir", "on", "rank", "fd", "pid", "fd_dir")

    def __init__(self) -> None:
        self.dir, self.on, self.rank = "", False, "-"
        self.fd: int | None = None
        self.pid, self.fd_dir = -1, ""


def _make_tracer() -> tuple[
    Callable[..., None], Callable[[str, str, dict[str, object], bool], None], Callable[[bool], int | None]
]:
    """Build the line writer and its sink over closure cells only: teardown clears module globals,
    not the cells a function closes over."""
    environ = os.environ
    getpid, os_open, os_write, os_close, makedirs, join = (
        os.getpid,
        os.open,
        os.write,
        os.close,
        os.makedirs,
        os.path.join,
    )
    flags = os.O_APPEND | os.O_CREAT | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
    wall_clock, mono_clock, gmtime, strftime = time.time, time.monotonic, time.gmtime, time.strftime
    current_thread = threading.current_thread
    native_id = getattr(threading, "get_native_id", threading.get_ident)
    magic, env_dir, env_stderr = MAGIC, ENV_DIR, ENV_STDERR
    max_value, max_line = MAX_VALUE_CHARS, MAX_LINE_BYTES
    try:
        host = socket.gethostname() or "localhost"
    except Exception:
        host = "localhost"
    file_host = host.replace(os.sep, "_")
    state = _SinkState()

    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")

    def text(value: object, as_repr: bool) -> str:
        try:
            s = value if (not as_repr and isinstance(value, str)) else repr(value)
        except Exception:
            try:
                s = f"<unreprable {type(value).__name__}>"
            except Exception:
                s = "<unreprable>"
        return esc(s if len(s) <= max_value else s[:max_value] + "...")

    def sink(force: bool) -> int | None:
        try:
            d = environ.get(env_dir, "")
            on = environ.get(env_stderr, "") == "1"
            state.dir, state.on = d, on
        except Exception:
            d, on = state.dir, state.on
        if not d:
            return 2 if (on or force) else None
        pid = getpid()
        if state.fd is not None and state.pid == pid and state.fd_dir == d:
            return state.fd
        try:
            makedirs(d, exist_ok=True)
            new = os_open(join(d, f"{file_host}.{pid}.log"), flags, 0o644)
        except Exception:
            return 2
        cur = state.fd
        if cur is not None and state.pid == pid:
            if state.fd_dir == d:  # another thread opened it meanwhile
                os_close(new)
                return cur
            try:
                os_close(cur)
            except Exception:
                pass
        # A child after fork leaves the parent's fd open untouched: it may be shared on purpose.
        state.fd, state.pid, state.fd_dir = new, pid, d
        return new

    def emit(component: str, phase: str, fields: dict[str, object], force: bool) -> None:
        try:
            fd = sink(force)
            if fd is None:
                return
            now = wall_clock()
            sec = int(now)
            wall = strftime("%Y-%m-%dT%H:%M:%S", gmtime(sec)) + f".{int((now - sec) * 1e6):06d}Z"
            try:
                rank = (
                    environ.get("TPSERVE_RANK")
                    or environ.get("OMPI_COMM_WORLD_RANK")
                    or environ.get("PMIX_RANK")
                    or "-"
                )
                state.rank = rank
            except Exception:
                rank = state.rank
            try:
                thread = current_thread().name
            except Exception:
                thread = "?"
            cols = [
                magic,
                wall,
                f"{mono_clock():.6f}",
                esc(host),
                str(getpid()),
                text(rank, False),
                str(native_id()),
                text(thread, False),
                text(component, False),
                text(phase, False),
            ]
            for key, value in fields.items():
                cols.append(text(key, False).replace("=", "_") + "=" + text(value, True))
            data = ("\t".join(cols) + "\n").encode("utf-8", "backslashreplace")
            if len(data) > max_line:
                data = data[: max_line - 4] + b"...\n"
        except Exception:
            return
        try:
            os_write(fd, data)
        except Exception:
            if fd != 2:
                state.fd = None  # reopen next time
                try:
                    os_close(fd)
                except Exception:
                    pass
                try:
                    os_write(2, data)
                except Exception:
                    pass

    def trace(component: str, phase: str, **fields: object) -> None:
        """Write one trace line for ``component`` reaching ``phase``; a no-op unless tracing is on."""
        emit(component, phase, fields, False)

    return trace, emit, sink


trace, _emit, _sink = _make_tracer()


def _env_timeout() -> float:
    try:
        return float(os.environ.get(ENV_TIMEOUT, 30))
    except ValueError:
        return 30.0


class Watchdog:
    """Bounds one shutdown phase: traces ``<phase> begin`` / ``<phase> end``, and when the phase
    overruns, traces ``<phase> OVERRUN``, dumps every thread's stack and, if asked, exits.

    Two timers, because either alone misses a case: a Python timer thread writes the OVERRUN line
    and exits with ``exit_code``, but needs the GIL; ``faulthandler.dump_traceback_later``, armed
    ``grace`` seconds later, dumps from a C thread even while a hung C call holds the GIL, but can
    only exit with status 1. There is one such faulthandler timer per process: the live watchdogs
    share it, and arming it replaces any other user's.
    """

    def __init__(
        self,
        component: str,
        phase: str,
        timeout: float | None = None,
        exit_code: int | None = None,
        **fields: object,
    ) -> None:
        self.component, self.phase, self.fields = component, phase, fields
        self.timeout = _env_timeout() if timeout is None else float(timeout)
        if exit_code is None and os.environ.get(ENV_WATCHDOG_EXIT) == "1":
            exit_code = WATCHDOG_EXIT_CODE
        self.exit_code = exit_code
        self.grace = min(max(self.timeout, 1.0), 10.0)
        self.deadline = 0.0
        self._t0 = 0.0
        self._owner = ("?", 0)
        self._timer: threading.Timer | None = None
        self._done = False

    def start(self) -> Watchdog:
        """Trace the begin line and arm both timers (none when the timeout is 0 or less)."""
        self._t0 = time.monotonic()
        thread = threading.current_thread()
        self._owner = (thread.name, threading.get_native_id())
        _emit(self.component, f"{self.phase} begin", {"timeout": self.timeout, **self.fields}, False)
        if self.timeout <= 0:
            return self
        self.deadline = self._t0 + self.timeout
        with _lock:
            _armed.add(self)
        _rearm_backstop()
        timer = threading.Timer(self.timeout, self._fire)
        timer.daemon = True
        timer.name = f"tpserve-watchdog {self.component}/{self.phase}"
        try:
            timer.start()
            self._timer = timer
        except RuntimeError:
            pass  # no new threads at interpreter shutdown (3.12+): the faulthandler backstop remains
        return self

    def stop(self, exc: BaseException | None = None) -> None:
        """Disarm and trace the end line with the phase's duration (and the exception, if any)."""
        with _lock:
            if self._done:
                return
            self._done = True
            _armed.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        _rearm_backstop()
        fields: dict[str, object] = {"duration_ms": round((time.monotonic() - self._t0) * 1e3, 3)}
        if exc is not None:
            fields["exc"] = exc
        _emit(self.component, f"{self.phase} end", fields, False)

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop(exc)

    def _fire(self) -> None:
        with _lock:
            if self._done or self not in _armed:
                return
            _armed.discard(self)  # this watchdog reports now; the backstop is for the others
        _rearm_backstop()
        try:
            _emit(
                self.component,
                f"{self.phase} OVERRUN",
                {
                    "timeout": self.timeout,
                    "elapsed_ms": round((time.monotonic() - self._t0) * 1e3, 3),
                    "owner": self._owner[0],
                    "owner_tid": self._owner[1],
                    "exit": self.exit_code,
                },
                True,
            )
            faulthandler.dump_traceback(file=_sink(True) or 2, all_threads=True)
        except Exception:
            pass
        if self.exit_code is not None:
            os._exit(self.exit_code)


_lock = threading.Lock()
_armed: set[Watchdog] = set()
_backstop_armed = False


def _rearm_backstop() -> None:
    """Point the process's single faulthandler timer at the earliest pending backstop; cancel it only
    when this module armed it, so another user's timer (pytest's faulthandler_timeout) survives."""
    global _backstop_armed
    try:
        with _lock:
            now = time.monotonic()
            pending = [w for w in _armed if w.deadline + w.grace > now]  # passed ones already fired
            first = min(pending, key=lambda w: w.deadline + w.grace, default=None)
            if first is not None:
                faulthandler.dump_traceback_later(
                    first.deadline + first.grace - now,
                    repeat=False,
                    file=_sink(True) or 2,
                    exit=first.exit_code is not None,
                )
            elif _backstop_armed:
                faulthandler.cancel_dump_traceback_later()
            _backstop_armed = first is not None
    except Exception:
        pass


def phase_timer(
    component: str, phase: str, timeout: float | None = None, exit_code: int | None = None, **fields: object
) -> Watchdog:
    """A ``Watchdog`` to use as ``with phase_timer("worker", "drain"): ...``; ``fields`` go on the
    begin line. ``timeout`` defaults to ``TPSERVE_SHUTDOWN_TIMEOUT``."""
    return Watchdog(component, phase, timeout, exit_code, **fields)

"""``tpserve stacks TARGET``: every thread's Python stack of a running engine's ranks and its proxy, taken
without stopping them, merged into one view that says where each rank's loop thread is.

In-process side (``install``, called where a rank or a proxy starts): a daemon thread, ``tpserve-stacks``,
waits on a private pipe; a byte written into it makes that thread take the GIL and write every thread's
stack with ``faulthandler.dump_traceback`` into an anonymous in-memory file (``memfd``, name
``tpserve-stacks``) opened once at start-up, then an end line. Holding the GIL is what makes this safe: the
other threads are parked where they released it (an MPI broadcast, a gloo or NCCL collective, a sleep, a
graph replay), so their frames stand still. faulthandler's signal handler, which dumps without the GIL,
walks frames that a running thread is changing and crashed busy processes (SIGSEGV); it stays registered on
``DUMP_SIGNAL`` only for ``--force``: the one way to see a process whose GIL a hung C call holds, where no
thread can run Python and the walk is safe. Nothing to configure, nothing left on disk; the command reaches
both the pipe and the memfd through ``/proc/PID/fd`` (same user or root). A proxy also appends ``note``
lines there (the connection file it attached to), so its pid leads to its engine.

Command side (``collect`` + ``render``): TARGET is a connection file (rank 0's pid is in it), the pid of a
proxy, of mpirun (prted) or of a rank. The command finds the processes on this host, checks that each has
the memfd and its pipe (a process that does not is never touched), wakes them all at once, reads each new
dump, and classifies each rank's loop thread: in a collective (which one, called from where), in a graph
replay, waiting on the doorbell or on rank 0's intake (idle), in the scheduler, the sampler, the forward,
publishing, or a debug hook. Ranks whose loop threads are at different places are named; a stopped rank
(SIGSTOP, a debugger) cannot dump and is reported as stopped, and one whose GIL is held is named as such.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import re
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

DUMP_SIGNAL = signal.SIGUSR1
MEMFD_NAME = "tpserve-stacks"
NOTE_PREFIX = "# tpserve-stacks "
WORKER_MODULE = "tpserve.worker"

_lock = threading.Lock()
_fd: int | None = None  # the memfd the dumps go to
_pipe: tuple[int, int] | None = None  # (read end, write end) that wakes the dumping thread
DUMPER_THREAD = "tpserve-stacks"
END_KEY = "dump_end"  # a note with this key ends each dump the dumping thread writes


def install() -> int | None:
    """Starts the dumping thread and registers the ``--force`` signal dump (idempotent); returns the dump fd,
    or None where it cannot (no memfd and no temporary file, no pipe, no threads). A signal handler someone
    else installed first is chained, never replaced; a child after ``fork`` drops all of it (not a tpserve
    process)."""
    global _fd, _pipe
    with _lock:
        if _fd is not None:
            return _fd
        try:
            fd = _open_dump_fd()
            r, w = os.pipe()  # not inherited across exec
            previous = signal.getsignal(DUMP_SIGNAL)
            faulthandler.register(DUMP_SIGNAL, file=fd, all_threads=True,
                                  chain=previous not in (signal.SIG_DFL, None))
            threading.Thread(target=_serve_dumps, args=(r, fd), name=DUMPER_THREAD, daemon=True).start()
        except (OSError, ValueError, RuntimeError, AttributeError):
            return None
        _fd, _pipe = fd, (r, w)
        _write(fd, NOTE_PREFIX + json.dumps({"pid": os.getpid(), "wake_fd": w, "wake_ino": os.fstat(w).st_ino}) + "\n")
        os.register_at_fork(after_in_child=_forget_in_child)
        return fd


def _serve_dumps(r: int, fd: int) -> None:
    """The dumping thread: one dump, holding the GIL, per wake-up (wake-ups that arrive together share one)."""
    n = 0
    while True:
        try:
            if not os.read(r, 4096):
                return
        except OSError:
            return
        n += 1
        try:
            faulthandler.dump_traceback(file=fd, all_threads=True)
        except (OSError, ValueError):
            pass
        _write(fd, NOTE_PREFIX + json.dumps({END_KEY: n}) + "\n")


def note(**fields: object) -> None:
    """Appends facts for the command, one JSON line (a proxy: the connection file it attached to)."""
    fd = _fd
    if fd is not None:
        _write(fd, NOTE_PREFIX + json.dumps(fields, default=str) + "\n")


def _open_dump_fd() -> int:
    if hasattr(os, "memfd_create"):
        return os.memfd_create(MEMFD_NAME)  # close-on-exec: mpirun does not inherit it
    import tempfile

    fd, path = tempfile.mkstemp(prefix=f"{MEMFD_NAME}.")
    os.unlink(path)  # still readable through /proc/PID/fd, and gone with the process
    return fd


def _write(fd: int, text: str) -> None:
    try:
        os.write(fd, text.encode("utf-8", "backslashreplace"))
    except OSError:
        pass


def _forget_in_child() -> None:
    """The child of a fork has no dumping thread: it closes what it inherited and answers nothing."""
    global _fd, _pipe
    try:
        faulthandler.unregister(DUMP_SIGNAL)
    except (ValueError, RuntimeError):
        pass
    for fd in (_fd, *(_pipe or ())):
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
    _fd, _pipe = None, None


# -- the command: finding the processes -----------------------------------------------------------------


class StacksError(RuntimeError):
    """A TARGET that names nothing this command can read."""


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _cmdline(pid: int) -> list[str]:
    try:
        return _read(f"/proc/{pid}/cmdline").rstrip("\0").split("\0")
    except OSError:
        return []


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = _read(f"/proc/{pid}/environ")
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.split("\0") if "=" in kv)


def _state(pid: int) -> str:
    """The state letter of /proc/PID/stat (R, S, D, T stopped, t traced, Z zombie), or '' when gone."""
    try:
        stat = _read(f"/proc/{pid}/stat")
    except OSError:
        return ""
    return stat[stat.rfind(")") + 2 :][:1]


def _catches(pid: int, signum: int) -> bool:
    try:
        for line in _read(f"/proc/{pid}/status").splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _dump_path(pid: int) -> str | None:
    """The /proc path of the process's dump fd (its memfd, or the unlinked file of the fallback)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for name in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if link.startswith(f"/memfd:{MEMFD_NAME}") or f"/{MEMFD_NAME}." in link:
            return f"/proc/{pid}/fd/{name}"
    return None


def _is_worker(pid: int) -> bool:
    """A rank: ``python -m [mpi4py -m] tpserve.worker``; not mpirun, whose argv holds the same words."""
    argv = _cmdline(pid)
    if WORKER_MODULE not in argv:
        return False
    env = _environ(pid)
    return "OMPI_COMM_WORLD_RANK" in env or "PMIX_RANK" in env or os.path.basename(argv[0]).startswith("python")


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _launcher_of(pid: int) -> int | None:
    """The mpirun (or prted, or other launcher) above a rank: the nearest ancestor that is no worker."""
    import psutil

    try:
        parent = psutil.Process(pid).parent()
    except psutil.Error:
        return None
    while parent is not None and _is_worker(parent.pid):
        parent = parent.parent()
    return None if parent is None or parent.pid <= 1 else parent.pid


def _ranks_under(launcher: int) -> list[int]:
    return [p for p in _children(launcher) if _is_worker(p)]


@dataclass
class Target:
    """What TARGET names: the ranks found on this host, the proxy (if any), and what could not be found."""

    description: str
    ranks: list[int] = field(default_factory=list)  # pids
    proxy: int | None = None
    problems: list[str] = field(default_factory=list)


def resolve(target: str) -> Target:
    """A connection file, or the pid of a proxy, of mpirun/prted or of a rank -> the processes to dump."""
    if not target.isdigit():
        if not os.path.exists(target):
            raise StacksError(f"{target}: no such connection file (TARGET: a connection file or a pid)")
        try:
            rank0 = int(json.loads(_read(target))["pid"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StacksError(f"{target}: not a tpserve connection file with rank 0's pid ({e})") from None
        if not _is_worker(rank0):
            raise StacksError(f"{target}: rank 0 (pid {rank0}) is not running on this host: the engine is gone "
                              "or runs elsewhere (run tpserve stacks there)")
        return _from_rank(rank0, f"connection file {target}")
    pid = int(target)
    if not os.path.exists(f"/proc/{pid}"):
        raise StacksError(f"pid {pid}: no such process")
    if _is_worker(pid):
        return _from_rank(pid, f"rank pid {pid}")
    ranks = _ranks_under(pid)
    if _dump_path(pid) is not None:  # a proxy: its spawned engine below it, or the one it attached to
        found = Target(f"proxy pid {pid}", ranks, proxy=pid)
        if not ranks:
            for path in _notes(pid).get("connect", []):
                try:
                    rank0 = int(json.loads(_read(path))["pid"])
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                if _is_worker(rank0):
                    attached = _from_rank(rank0, "")
                    found.ranks, found.problems = attached.ranks, attached.problems
        if not found.ranks:
            found.problems.append(f"proxy pid {pid} has no engine on this host (none spawned; the connection file "
                                  "it attached to is gone or names another host)")
        return found
    if ranks:
        return _from_launcher(pid, f"mpirun pid {pid}")
    raise StacksError(f"pid {pid} ({' '.join(_cmdline(pid))[:80]}) is no tpserve proxy, mpirun or rank")


def _from_rank(rank_pid: int, description: str) -> Target:
    launcher = _launcher_of(rank_pid)
    if launcher is None:
        return Target(description, [rank_pid])
    found = _from_launcher(launcher, description)
    if rank_pid not in found.ranks:
        found.ranks.append(rank_pid)
    return found


def _from_launcher(launcher: int, description: str) -> Target:
    ranks = _ranks_under(launcher)
    found = Target(f"{description} (mpirun pid {launcher})" if description else "", ranks)
    sizes = {_environ(p).get("OMPI_COMM_WORLD_SIZE") for p in ranks}
    size = next((int(s) for s in sizes if s and s.isdigit()), len(ranks))
    if size > len(ranks):
        found.problems.append(f"{size - len(ranks)} of {size} ranks are not on this host: run tpserve stacks with "
                              "the pid of prted (or a rank) on their hosts")
    return found


def _notes(pid: int) -> dict[str, list[str]]:
    path = _dump_path(pid)
    out: dict[str, list[str]] = {}
    if path is None:
        return out
    try:
        text = _read(path)
    except OSError:
        return out
    for line in text.splitlines():
        if line.startswith(NOTE_PREFIX):
            try:
                fields = json.loads(line[len(NOTE_PREFIX) :])
            except ValueError:
                continue
            for k, v in fields.items() if isinstance(fields, dict) else ():
                out.setdefault(k, []).append(str(v))
    return out


# -- the command: dumping and parsing ---------------------------------------------------------------------


@dataclass
class Frame:
    file: str
    line: str
    func: str

    def short(self) -> str:
        path = self.file
        i = path.rfind("/tpserve/")
        path = path[i + 1 :] if i >= 0 else path.rsplit("/", 1)[-1]
        return f"{path}:{self.line} in {self.func}"


@dataclass
class Thread:
    ident: str
    current: bool
    frames: list[Frame]  # innermost first, as faulthandler prints them
    role: str = "thread"


@dataclass
class Process:
    pid: int
    kind: str  # "proxy" or "rank"
    rank: int | None = None
    state: str = ""
    threads: list[Thread] = field(default_factory=list)
    error: str | None = None  # why there is no dump
    loop: Location | None = None


@dataclass
class Location:
    kind: str  # collective, graph replay, doorbell, intake, scheduler, sampler, forward, publish, ...
    detail: str
    key: str  # what ranks must share to agree

    def text(self) -> str:
        return f"{_KIND_TEXT.get(self.kind, self.kind)}: {self.detail}"


_KIND_TEXT = {
    "collective": "in a collective",
    "graph replay": "in a graph replay",
    "doorbell": "waiting on the doorbell (idle)",
    "intake": "waiting for requests on rank 0's intake (idle)",
    "scheduler": "in the scheduler",
    "sampler": "in the sampler",
    "forward": "in the model's forward",
    "publish": "publishing responses",
    "debug hook": "in a debug hook",
    "loop": "in the executor loop",
    "teardown": "tearing down",
}

_THREAD_LINE = re.compile(r"^(Current thread|Thread) (0x[0-9a-fA-F]+)")
_FRAME_LINE = re.compile(r'^  File "(.*)", line (\S+) in (.*)$')
_OUTERMOST = ("<module>", "_run_module_as_main", "_run_code")


def parse_dump(text: str) -> list[Thread]:
    """faulthandler's all-threads format: a header per thread, its frames innermost first, a blank line."""
    threads: list[Thread] = []
    for line in text.splitlines():
        m = _THREAD_LINE.match(line)
        if m:
            threads.append(Thread(m.group(2), m.group(1) == "Current thread", []))
            continue
        m = _FRAME_LINE.match(line)
        if m and threads:
            threads[-1].frames.append(Frame(m.group(1), m.group(2), m.group(3)))
    return threads


def _dump_complete(text: str) -> bool:
    """The main thread comes last and ends with the program's outermost frame; the caller also accepts a
    dump that stopped growing (a main thread that already returned)."""
    if not text.endswith("\n"):
        return False
    last = text.rstrip("\n").rsplit("\n", 1)[-1]
    m = _FRAME_LINE.match(last)
    return bool(m) and m.group(3) in _OUTERMOST


def _wake(pid: int, notes: dict[str, list[str]]) -> str | None:
    """Writes one byte into the process's wake pipe, found through /proc (the noted fd, checked against the
    noted inode so a reused fd number is never written); returns why it could not, or None."""
    try:
        wfd, ino = int(notes["wake_fd"][-1]), int(notes["wake_ino"][-1])
        if os.readlink(f"/proc/{pid}/fd/{wfd}") != f"pipe:[{ino}]":
            return "its wake pipe is gone"
        w = os.open(f"/proc/{pid}/fd/{wfd}", os.O_WRONLY | os.O_NONBLOCK)
    except (KeyError, ValueError, IndexError):
        return "has no wake pipe (started by an older tpserve?): try --force"
    except OSError as e:
        return f"cannot open its wake pipe ({e.strerror})"
    try:
        os.write(w, b"\n")
    except BlockingIOError:
        pass  # a pipe full of wake-ups: it is already asked
    except OSError as e:
        return f"cannot wake it ({e.strerror})"
    finally:
        os.close(w)
    return None


def _is_end(line: str) -> bool:
    """The note the dumping thread writes after each dump."""
    return line.startswith(NOTE_PREFIX) and f'"{END_KEY}"' in line


def _ended(text: str) -> bool:
    return any(_is_end(line) for line in text.splitlines())


def _take_dumps(procs: list[Process], paths: dict[int, str], timeout: float, force: bool = False) -> None:
    """Wakes every process's dumping thread at once (a consistent snapshot), or signals them with ``force``,
    then reads what each appended."""
    offsets: dict[int, int] = {}
    for p in procs:
        if p.error is None:
            try:
                offsets[p.pid] = os.stat(paths[p.pid]).st_size
            except OSError as e:
                p.error = f"cannot read its dump file ({e.strerror})"
    for p in procs:
        if p.pid in offsets:
            if force:
                try:
                    os.kill(p.pid, DUMP_SIGNAL)
                except OSError as e:
                    p.error = f"cannot signal it ({e.strerror})"
            else:
                p.error = _wake(p.pid, _notes(p.pid))
            if p.error is not None:
                del offsets[p.pid]
    quiet_s = 0.5
    deadline = time.monotonic() + timeout
    pending = dict(offsets)
    seen: dict[int, tuple[int, float]] = {}
    texts: dict[int, str] = {}
    while pending and time.monotonic() < deadline:
        for pid, offset in list(pending.items()):
            try:
                with open(paths[pid], "rb") as f:
                    f.seek(offset)
                    text = f.read().decode("utf-8", "replace")
            except OSError:
                text = texts.get(pid, "")
            texts[pid] = text
            now = time.monotonic()
            if len(text) != seen.get(pid, (-1, 0.0))[0]:
                seen[pid] = (len(text), now)
            if not force:
                done = _ended(text)
            else:  # the signal handler writes no end line
                done = bool(text) and (_dump_complete(text) or now - seen[pid][1] >= quiet_s)
            if done:
                del pending[pid]
        if pending:
            time.sleep(0.02)
    for p in procs:
        if p.pid in offsets:
            text = texts.get(p.pid, "")
            if not force and _ended(text):  # one dump: up to its end line
                lines = text.splitlines()
                text = "\n".join(lines[: next(i for i, x in enumerate(lines) if _is_end(x))])
            text = "\n".join(x for x in text.splitlines() if not x.startswith(NOTE_PREFIX))
            p.threads = [t for t in parse_dump(text) if not _is_dumper(t)]
            if not p.threads:
                p.state = _state(p.pid) or "gone"
                if p.state in ("T", "t"):
                    p.error = "stopped (SIGSTOP or a debugger): it dumps when continued"
                elif force or p.state == "gone":
                    p.error = f"no dump within {timeout:g} s ({'gone' if p.state == 'gone' else 'state ' + p.state})"
                else:
                    p.error = (f"no dump within {timeout:g} s: its dumping thread got no GIL, so a thread likely "
                               "holds the GIL (a hung C call?); --force dumps without the GIL (safe only while "
                               "no thread runs Python)")


def _is_dumper(thread: Thread) -> bool:
    return any(f.func == "_serve_dumps" and f.file.endswith("tpserve/stacks.py") for f in thread.frames)


# -- the command: what the stacks say ---------------------------------------------------------------------

_THREAD_ROLES = [  # (file suffix, function) -> role; the outermost matching frame decides
    ("tpserve/worker/main.py", "loop", "executor-loop"),
    ("tpserve/executor/executor.py", "run", "executor-loop"),
    ("tpserve/worker/rank0_io.py", "_intake_loop", "rank0-intake"),
    ("tpserve/worker/rank0_io.py", "_send_loop", "rank0-sender"),
    ("tpserve/proxy/client.py", "_dispatch_loop", "tpserve-dispatch"),
    ("tpserve/shutdown_trace.py", "_fire", "tpserve-watchdog"),
]


def _role(thread: Thread, last: bool) -> str:
    for frame in reversed(thread.frames):
        for suffix, func, role in _THREAD_ROLES:
            if frame.func == func and frame.file.endswith(suffix):
                return role
    outer = thread.frames[-1].func if thread.frames else ""
    if last and outer != "_bootstrap":
        return "main"
    return "thread"


_SITES = [  # (file suffix, functions or None for any) -> (kind, what); the innermost tpserve match decides
    ("tpserve/executor/request_queue.py", {"_sleep_until"}, "doorbell", "RequestQueue._sleep_until"),
    ("tpserve/executor/request_queue.py", {"_drain"}, "intake", "RequestQueue._drain"),
    ("tpserve/executor/request_queue.py", {"fetch", "_open_doorbell"}, "collective",
     "MPI broadcast of the new items (RequestQueue.fetch)"),
    ("tpserve/executor/instrument.py", {"__call__"}, "collective", "MPI gather of the cross-rank check"),
    ("tpserve/executor/instrument.py", None, "debug hook", ""),
    ("tpserve/executor/cuda_graphs.py", None, "graph replay", ""),
    ("tpserve/executor/scheduler.py", None, "scheduler", ""),
    ("tpserve/executor/block_manager.py", None, "scheduler", ""),
    ("tpserve/executor/sampler.py", None, "sampler", ""),
    ("tpserve/model/", None, "forward", ""),
    ("tpserve/kernels/", None, "forward", ""),
    ("tpserve/executor/model_runner.py", None, "forward", ""),
    ("tpserve/worker/publisher.py", None, "publish", ""),
    ("tpserve/worker/rank0_io.py", None, "publish", ""),
    ("tpserve/worker/teardown.py", None, "teardown", ""),
    ("tpserve/executor/executor.py", None, "loop", ""),
]


def locate(thread: Thread) -> Location:
    """Where a loop thread is, from its innermost frames: a torch.distributed or mpi4py call is a collective
    (named with the tpserve frame that made it), else the innermost tpserve frame's part of the loop."""
    frames = thread.frames
    for i, f in enumerate(frames):
        if "/tpserve/" not in f.file:
            continue
        caller = f.short()
        inner = [g for g in frames[:i] if "/torch/distributed/" in g.file]
        if inner:  # the c10d function itself, not its logging wrapper
            op = next((g.func for g in inner if g.file.endswith("distributed_c10d.py")), inner[0].func)
            return Location("collective", f"torch.distributed {op} (from {caller})", f"collective {caller}")
        for suffix, funcs, kind, what in _SITES:
            if suffix in f.file and (funcs is None or f.func in funcs):
                key = "idle fetch" if kind in ("doorbell", "intake") else f"{kind} {caller}"
                if kind == "collective":
                    key = f"collective {caller}"
                return Location(kind, f"{what} ({caller})" if what else caller, key)
        return Location("other", caller, f"other {caller}")
    top = frames[0].short() if frames else "no Python frame"
    return Location("other", top, f"other {top}")


def collect(target: str, timeout: float = 5.0, force: bool = False) -> tuple[Target, list[Process]]:
    """Finds TARGET's processes, dumps them (``force``: by the signal handler, without the GIL) and classifies
    their threads."""
    found = resolve(target)
    procs: list[Process] = []
    if found.proxy is not None:
        procs.append(Process(found.proxy, "proxy"))
    for pid in found.ranks:
        rank = _environ(pid).get("OMPI_COMM_WORLD_RANK") or _environ(pid).get("PMIX_RANK")
        procs.append(Process(pid, "rank", int(rank) if rank and rank.isdigit() else None))
    procs.sort(key=lambda p: (p.kind != "proxy", p.rank if p.rank is not None else 1 << 30, p.pid))
    paths: dict[int, str] = {}
    for p in procs:
        p.state = _state(p.pid)
        path = _dump_path(p.pid)
        if not p.state:
            p.error = "gone"
        elif path is None or (force and not _catches(p.pid, DUMP_SIGNAL)):
            p.error = ("does not take stack dumps (started by a tpserve without `tpserve stacks`, or its "
                       "signal handler was replaced): not signalled")
        elif p.state in ("T", "t"):
            p.error = "stopped (SIGSTOP or a debugger): cannot dump until continued"
        else:
            paths[p.pid] = path
    _take_dumps(procs, paths, timeout, force)
    for p in procs:
        for i, t in enumerate(p.threads):
            t.role = _role(t, i == len(p.threads) - 1)
        loop = next((t for t in p.threads if t.role == "executor-loop"), None)
        if p.kind == "rank" and p.threads:
            p.loop = locate(loop) if loop is not None else Location("no loop", "no executor-loop thread "
                                                                    "(starting up or ended)", "no loop")
    return found, procs


def disagreement(procs: list[Process]) -> list[str]:
    """Lines naming the ranks whose loop threads are elsewhere than the others' (empty when all agree)."""
    ranks = [p for p in procs if p.kind == "rank"]
    groups: dict[str, list[Process]] = {}
    for p in ranks:
        key = p.loop.key if p.loop is not None else f"no dump: {p.error}"
        groups.setdefault(key, []).append(p)
    if len(groups) <= 1:
        return []

    def names(ps: list[Process]) -> str:
        return ", ".join(str(p.rank if p.rank is not None else f"pid {p.pid}") for p in ps)

    def where(ps: list[Process]) -> str:
        p = ps[0]
        return p.loop.text() if p.loop is not None else (p.error or "?")

    ordered = sorted(groups.values(), key=len, reverse=True)
    lines = [f"ranks disagree: {len(groups)} different places"]
    lines += [f"  rank{'s' if len(g) > 1 else ''} {names(g)}: {where(g)}" for g in ordered]
    waiting = [p for p in ranks if p.loop is not None and p.loop.kind == "collective"]
    elsewhere = [p for p in ranks if p not in waiting]
    if waiting and elsewhere:
        many, others = len(waiting) > 1, f"rank{'s' if len(elsewhere) > 1 else ''} {names(elsewhere)}"
        lines.append(f"  rank{'s' if many else ''} {names(waiting)} wait{'' if many else 's'} in a collective that "
                     f"{others} did not join: look at {others}")
    lines.append("  (one snapshot: a busy engine's ranks differ for an instant; ranks that differ in every "
                 "snapshot point at the hang)")
    return lines


def render(found: Target, procs: list[Process], full: bool = True) -> str:
    """The merged view: one line per process (a rank: where its loop thread is), disagreements, then every
    thread's stack unless ``full`` is off."""
    out = [f"tpserve stacks: {found.description}"]
    for p in procs:
        who = "proxy  " if p.kind == "proxy" else f"rank {p.rank if p.rank is not None else '?'}"
        if p.error is not None:
            out.append(f"{who} pid {p.pid}: {p.error}")
        elif p.kind == "rank":
            out.append(f"{who} pid {p.pid}: loop thread {p.loop.text() if p.loop else '?'}")
        else:
            roles = ", ".join(f"{t.role} at {t.frames[0].short() if t.frames else '-'}" for t in p.threads
                              if t.role != "thread")
            out.append(f"{who} pid {p.pid}: {len(p.threads)} threads ({roles})")
    out += [f"note: {x}" for x in found.problems]
    out += disagreement(procs) or ([] if len([p for p in procs if p.kind == "rank"]) < 2
                                   else ["ranks agree: every loop thread is at the same place"])
    if full:
        for p in procs:
            if not p.threads:
                continue
            who = "proxy" if p.kind == "proxy" else f"rank {p.rank}"
            out.append(f"\n== {who} (pid {p.pid}): {len(p.threads)} threads")
            for t in p.threads:
                out.append(f"-- {t.role} {t.ident}{' (took the signal)' if t.current else ''}")
                out += [f"   {f.short()}" for f in t.frames]
    return "\n".join(out) + "\n"


def as_json(found: Target, procs: list[Process]) -> str:
    return json.dumps({"target": asdict(found), "processes": [asdict(p) for p in procs],
                       "disagreement": disagreement(procs)}, indent=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tpserve stacks", description="Dump every thread's Python stack of a running "
                                "engine's ranks and proxy, without stopping them, as one view.")
    p.add_argument("target", metavar="TARGET", help="a connection file, or the pid of a proxy, of mpirun or of a rank")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each dump (default 5)")
    p.add_argument("--force", action="store_true", help="dump by signal, without the GIL: the way to see a process "
                   "whose GIL a hung C call holds; may crash a process whose threads run Python")
    p.add_argument("--summary", action="store_true", help="the per-rank lines only, without every stack")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("tpserve stacks: needs Linux (/proc)", file=sys.stderr)
        return 2
    try:
        found, procs = collect(args.target, args.timeout, args.force)
    except StacksError as e:
        print(f"tpserve stacks: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(as_json(found, procs) + "\n" if args.json else render(found, procs, full=not args.summary))
    return 0 if procs and all(p.error is None for p in procs) else 1

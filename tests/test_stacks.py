"""`tpserve stacks` against real engines, really signalled: by connection file, by the pid of a proxy, of mpirun
and of a rank; idle, mid-stream (the streams finish with every token: the dump stops nothing), and with a rank
really wedged (held by a test hook, or stopped with SIGSTOP) while rank 0 waits in a collective."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from helpers import ROOT, built_model, kill_session, launch_logged, listener_failed

from tpserve import LLM, SamplingParams
from tpserve.proxy.launcher import mpi_environment, mpirun_path
from tpserve.stacks import collect

LONG = SamplingParams(max_tokens=600, temperature=0, ignore_eos=True)

# Runs mpirun in this session and takes the whole session down when the test process dies (even by kill -9):
# an attached engine does not watch its proxy, and nothing else would end it.
GUARD = textwrap.dedent("""
    import os, subprocess, sys, time
    from tpserve.proxy.launcher import session_pids
    parent = os.getppid()
    child = subprocess.Popen(sys.argv[1:])
    while child.poll() is None:
        if os.getppid() != parent:
            for pid in session_pids(os.getsid(0)):
                if pid != os.getpid():
                    os.kill(pid, 9)
            break
        time.sleep(0.2)
    sys.exit(child.wait(30))
""")

# A spawning proxy that streams one long request, prints its token count and exits at EOF on stdin (the test
# closes it, or dies): its workers end with it (the pidfd of a spawned engine's proxy).
PROXY = textwrap.dedent("""
    import json, os, sys
    from tpserve import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], tensor_parallel_size=1, max_seq_len=2100)
    stream = llm.generate_stream([5, 6, 7], SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True))
    print(json.dumps({"pid": os.getpid(), "mpirun": llm.workers.pid}), flush=True)
    print(json.dumps({"tokens": len(stream.result(timeout=300).token_ids)}), flush=True)
    sys.stdin.read()
    llm.shutdown()
""")


# A process whose two threads run Python without pause: faulthandler's C handler, which walks every thread's
# frames without the GIL, crashed such a process (SIGSEGV) within a few dumps.
BUSY = textwrap.dedent("""
    import threading, time
    from tpserve import stacks
    stacks.install()
    def deep(n):
        return 0 if n == 0 else deep(n - 1) + 1
    def busy():
        while True:
            for d in (5, 50, 200, 400):
                deep(d)
    for _ in range(2):
        threading.Thread(target=busy, daemon=True).start()
    print("ready", flush=True)
    time.sleep(120)
""")

# A process whose main thread holds the GIL in a hung C call (ctypes.PyDLL keeps the GIL across the call).
HOLDS_GIL = textwrap.dedent("""
    import ctypes
    from tpserve import stacks
    stacks.install()
    print("ready", flush=True)
    while True:  # a signal ends sleep(3) early
        ctypes.PyDLL(None).sleep(120)
""")


def stacks(target: object, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tpserve.cli", "stacks", str(target), "--summary"], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def rank_line(view: str, rank: int) -> str:
    found = re.findall(rf"^rank {rank} pid \d+: .*$", view, re.M)
    assert len(found) == 1, view
    return found[0]


def until(check, timeout: float, what: str) -> str:
    """Runs ``tpserve stacks`` until ``check(view)`` holds (a snapshot may catch a rank on its way)."""
    deadline = time.monotonic() + timeout
    view = ""
    while time.monotonic() < deadline:
        view = check()
        if view:
            return view
        time.sleep(0.2)
    raise AssertionError(f"no view showed {what} within {timeout} s; last:\n{view}")


class AttachedEngine:
    """``mpirun -n N python -m tpserve.worker --connection-file F`` under GUARD, in a session of its own."""

    def __init__(self, tmp: Path, n: int, env: dict[str, str]) -> None:
        self.conn = tmp / "engine.json"
        cmd = [sys.executable, "-c", GUARD, mpirun_path(), "-n", str(n), sys.executable, "-m", "mpi4py", "-m",
               "tpserve.worker", "--model", str(built_model("llama")), "--max-seq-len", "2100",
               "--connection-file", str(self.conn)]
        self.log = tmp / "workers.log"
        env = {**mpi_environment(n), **env}
        self.popen = launch_logged(cmd, env, self.log)
        relaunched = False
        deadline = time.monotonic() + 120
        while not self.conn.exists():
            if not relaunched and listener_failed(self.popen, self.log):
                relaunched, self.popen = True, launch_logged(cmd, env, self.log)
            assert self.popen.poll() is None, self.log.read_text(errors="replace")
            assert time.monotonic() < deadline, "no connection file"
            time.sleep(0.1)
        self.ranks = {}
        for p in psutil.Process(self.popen.pid).children(recursive=True):
            env_ = p.environ()
            if "OMPI_COMM_WORLD_RANK" in env_ and "tpserve.worker" in p.cmdline():
                self.ranks[int(env_["OMPI_COMM_WORLD_RANK"])] = p
        self.mpirun = psutil.Process(self.popen.pid).children()[0].pid
        assert sorted(self.ranks) == list(range(n)), self.ranks


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stacks-tp2")
    hold = tmp / "hold"
    engine = AttachedEngine(tmp, 2, {"TPSERVE_FAULT_HOLD": f"1:{hold}"})
    engine.hold = hold
    try:
        # The connection file comes before the ranks' loop threads start (a rank may still be collecting).
        until(lambda: "" if "no executor-loop" in (v := stacks(engine.conn).stdout) else v, 30, "both loop threads")
        yield engine
    finally:
        kill_session(engine.popen)


def test_a_process_that_takes_no_dumps_is_refused_and_never_signalled():
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        result = stacks(sleeper.pid)
        assert result.returncode == 2 and "is no tpserve proxy, mpirun or rank" in result.stderr, result
        time.sleep(0.2)
        assert sleeper.poll() is None  # SIGUSR1's default action would have ended it
    finally:
        sleeper.kill()
        sleeper.wait(10)
    result = stacks("/nonexistent/engine.json")
    assert result.returncode == 2 and "no such connection file" in result.stderr, result


def started(script: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_dumps_never_crash_a_process_whose_threads_run_python():
    proc = started(BUSY)
    try:
        for i in range(40):
            _, procs = collect(str(proc.pid), timeout=10)
            assert proc.poll() is None, f"dump {i} killed the process (exit {proc.returncode})"
            (p,) = procs
            assert p.error is None, p.error
            assert sum(any(f.func in ("busy", "deep") for f in t.frames) for t in p.threads) == 2, p.threads
            assert not any(t.role == "tpserve-stacks" for t in p.threads), "the dumping thread is not shown"
    finally:
        kill_session(proc)


def test_a_thread_holding_the_gil_is_named_and_force_dumps_without_it():
    proc = started(HOLDS_GIL)
    try:
        _, procs = collect(str(proc.pid), timeout=1.5)
        assert "holds the GIL" in procs[0].error and "--force" in procs[0].error, procs[0].error
        _, procs = collect(str(proc.pid), timeout=10, force=True)
        (p,) = procs
        assert p.error is None, p.error
        main = [t for t in p.threads if t.role == "main"]
        assert len(main) == 1 and main[0].frames[-1].func == "<module>", p.threads
        assert proc.poll() is None
    finally:
        kill_session(proc)


def test_tp2_idle_by_connection_file_by_mpirun_pid_and_by_rank_pid(tp2):
    for target in (tp2.conn, tp2.mpirun, tp2.ranks[1].pid):
        result = stacks(target)
        view = result.stdout
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert "loop thread waiting for requests on rank 0's intake (idle)" in rank_line(view, 0), view
        assert "loop thread waiting on the doorbell (idle)" in rank_line(view, 1), view
        assert "ranks agree" in view and "disagree" not in view, view
        assert "proxy" not in view, view
    full = subprocess.run([sys.executable, "-m", "tpserve.cli", "stacks", str(tp2.conn)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60).stdout
    for who in ("rank 0", "rank 1"):  # every thread's stack, each named
        assert re.search(rf"== {who} \(pid \d+\): \d+ threads", full), full
    assert full.count("-- executor-loop") == 2 and "-- rank0-intake" in full and "-- rank0-sender" in full, full
    assert "tpserve/executor/request_queue.py" in full and full.count("-- main") == 2, full


def test_tp2_a_wedged_rank_is_named_held_or_stopped_and_the_streams_finish(tp2):
    """Rank 1 held in a test hook, then stopped with SIGSTOP: each time rank 0 waits in a collective and the view
    names rank 1; each time the stream then finishes with every token. One attached proxy (its shutdown ends the
    engine), so this runs after the idle views."""
    with LLM(connect=str(tp2.conn)) as llm:
        tp2.hold.touch()
        try:
            stream = llm.generate_stream([3, 4, 5], LONG)

            def held() -> str:
                view = stacks(tp2.conn).stdout
                ok = "in a debug hook" in rank_line(view, 1) and "in a collective" in rank_line(view, 0)
                return view if ok else ""

            view = until(held, 30, "rank 1 held and rank 0 in a collective")
            assert "_hold" in rank_line(view, 1), view
            assert "ranks disagree" in view and "look at rank 1" in view, view
            # The proxy's pid leads to the engine it attached to (its note), and shows the proxy's threads.
            by_proxy = stacks(os.getpid()).stdout
            assert re.search(r"^proxy +pid \d+: \d+ threads \(.*tpserve-dispatch", by_proxy, re.M), by_proxy
            assert "in a debug hook" in rank_line(by_proxy, 1), by_proxy
        finally:
            tp2.hold.unlink(missing_ok=True)
        out = stream.result(timeout=120)
        assert (out.finish_reason, len(out.token_ids)) == ("length", LONG.max_tokens), out

        stream = llm.generate_stream([9, 8, 7], LONG)
        next(iter(stream))
        victim = tp2.ranks[1]
        victim.send_signal(signal.SIGSTOP)
        try:
            def wedged() -> str:
                result = stacks(tp2.conn)
                view = result.stdout
                ok = "in a collective" in rank_line(view, 0) and "stopped (SIGSTOP" in rank_line(view, 1)
                return view if ok and result.returncode == 1 else ""

            view = until(wedged, 30, "rank 1 stopped and rank 0 in a collective")
            assert "ranks disagree" in view and "look at rank 1" in view, view
        finally:
            victim.send_signal(signal.SIGCONT)
        out = stream.result(timeout=120)
        assert (out.finish_reason, len(out.token_ids)) == ("length", LONG.max_tokens), out
        # The dump rank 1 owed arrives after SIGCONT and harms nothing: the engine answers as before.
        assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)[0].token_ids
    assert tp2.popen.wait(60) == 0  # the attached proxy's shutdown ended the engine


def test_tp1_spawned_by_proxy_pid_and_mpirun_pid_mid_stream():
    proxy = subprocess.Popen([sys.executable, "-c", PROXY, str(built_model("llama"))], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        started = json.loads(proxy.stdout.readline())
        for target in (proxy.pid, started["mpirun"]) * 3:
            result = stacks(target)
            view = result.stdout
            assert result.returncode == 0, (view, result.stderr)
            line = rank_line(view, 0)
            assert re.search(r"loop thread (in |waiting|publishing)", line), view
            if target == proxy.pid:
                assert re.search(rf"^proxy +pid {proxy.pid}: \d+ threads \(.*tpserve-dispatch.*main", view, re.M), view
            else:
                assert "proxy" not in view, view
        assert json.loads(proxy.stdout.readline()) == {"tokens": 1500}  # six dumps mid-stream stopped nothing
        proxy.stdin.close()
        assert proxy.wait(60) == 0
    finally:
        kill_session(proxy)

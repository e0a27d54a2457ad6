"""Shutdown tracing in real processes: teardown, os._exit, threads, the watchdog, the merged report."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tpserve import trace_view
from tpserve.shutdown_trace import COLUMNS, MAGIC

REPO = Path(__file__).resolve().parents[1]
TRACE_ENV = (
    "TPSERVE_SHUTDOWN_TRACE_DIR",
    "TPSERVE_SHUTDOWN_TRACE",
    "TPSERVE_RANK",
    "OMPI_COMM_WORLD_RANK",
    "PMIX_RANK",
)


def run_py(code: str, timeout: float = 15, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with only the given trace variables set."""
    full = {
        k: v for k, v in os.environ.items() if k not in TRACE_ENV and not k.startswith("TPSERVE_SHUTDOWN")
    }
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full.get("PYTHONPATH", "")]))
    full.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def trace_lines(directory: Path) -> list[trace_view.Event]:
    events = [e for e in trace_view.load(directory) if e.dump is None]
    assert events, f"no trace lines in {list(directory.iterdir())}"
    return events


def test_trace_to_dir_writes_every_column(tmp_path: Path) -> None:
    proc = run_py(
        """
        import threading
        from tpserve.shutdown_trace import trace

        class Unreprable:
            def __repr__(self):
                raise RuntimeError("no")

        def work():
            trace("worker", "drain", n=3, text="a\\tb\\nc", bad=Unreprable(), rank=None)

        t = threading.Thread(target=work, name="loop")
        t.start()
        t.join()
        """,
        TPSERVE_SHUTDOWN_TRACE_DIR=str(tmp_path / "traces"),
        TPSERVE_RANK="3",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    (path,) = (tmp_path / "traces").glob("*.log")
    raw = path.read_text()
    cols = raw.rstrip("\n").split("\t")
    assert raw.count("\n") == 1 and cols[0] == MAGIC and len(cols) == len(COLUMNS) + 4
    (event,) = trace_lines(tmp_path / "traces")
    assert path.name == f"{event.host}.{event.pid}.log"
    assert (event.rank, event.thread, event.component, event.phase) == ("3", "loop", "worker", "drain")
    assert event.tid > 0 and event.mono > 0 and abs(event.wall - time.time()) < 60
    assert event.fields == {
        "n": "3",
        "text": repr("a\tb\nc"),
        "bad": "<unreprable Unreprable>",
        "rank": "None",
    }


def test_trace_goes_to_stderr_without_dir_and_is_silent_when_off() -> None:
    code = """
        from tpserve.shutdown_trace import trace
        trace("proxy", "send_sentinel", retries=2)
        """
    on = run_py(code, TPSERVE_SHUTDOWN_TRACE="1", OMPI_COMM_WORLD_RANK="1")
    assert on.returncode == 0
    event = trace_view.parse_line(on.stderr.rstrip("\n"))
    assert event is not None and (event.rank, event.phase, event.fields) == (
        "1",
        "send_sentinel",
        {"retries": "2"},
    )
    off = run_py(code)
    assert off.returncode == 0 and off.stderr == "" and off.stdout == ""


def test_trace_survives_teardown_and_os_exit(tmp_path: Path) -> None:
    """atexit registered first (runs last, after logging.shutdown), __del__ of a __main__ global during
    finalization, a trace() whose module globals were cleared, and the line right before os._exit."""
    teardown = run_py(
        """
        import atexit, sys

        def last():
            import logging
            logging.shutdown()
            trace("proxy", "atexit_last", finalizing=sys.is_finalizing())

        atexit.register(last)
        from tpserve.shutdown_trace import trace
        atexit.register(lambda: trace("proxy", "atexit_first"))

        class Late:
            def __del__(self, trace=trace, sys=sys):
                trace("proxy", "del_at_teardown", finalizing=sys.is_finalizing())

        late = Late()
        trace("proxy", "main_done")
        """,
        TPSERVE_SHUTDOWN_TRACE_DIR=str(tmp_path),
    )
    assert teardown.returncode == 0 and teardown.stderr == "", teardown.stderr
    hard_exit = run_py(
        """
        import os, sys
        from tpserve import shutdown_trace
        trace, _exit = shutdown_trace.trace, os._exit
        for name in list(vars(shutdown_trace)):
            if not name.startswith("__"):
                setattr(shutdown_trace, name, None)  # what teardown does to module globals
        trace("worker", "globals_cleared")
        trace("worker", "exit", code=0)
        _exit(0)
        """,
        TPSERVE_SHUTDOWN_TRACE_DIR=str(tmp_path),
        TPSERVE_RANK="0",
    )
    assert hard_exit.returncode == 0 and hard_exit.stderr == "", hard_exit.stderr
    phases = [(e.phase, e.fields.get("finalizing")) for e in trace_view.merge(trace_lines(tmp_path))]
    assert phases == [
        ("main_done", None),
        ("atexit_first", None),
        ("atexit_last", "False"),
        ("del_at_teardown", "True"),
        ("globals_cleared", None),
        ("exit", None),
    ]


def test_a_forked_child_writes_its_own_file(tmp_path: Path) -> None:
    proc = run_py(
        """
        import os
        from tpserve.shutdown_trace import trace

        trace("proxy", "before_fork")
        child = os.fork()
        if child == 0:
            trace("worker", "in_child")
            os._exit(0)
        os.waitpid(child, 0)
        trace("proxy", "after_fork", child=child)
        """,
        TPSERVE_SHUTDOWN_TRACE_DIR=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    by_file = {
        p.name: [e.phase for e in trace_view.load(tmp_path) if e.source == str(p)]
        for p in tmp_path.glob("*.log")
    }
    events = trace_view.merge(trace_lines(tmp_path))
    parent, child = events[0].pid, int(events[-1].fields["child"])
    assert by_file == {
        f"{events[0].host}.{parent}.log": ["before_fork", "after_fork"],
        f"{events[0].host}.{child}.log": ["in_child"],
    }


def test_threads_never_interleave_within_a_line(tmp_path: Path) -> None:
    proc = run_py(
        """
        import threading
        from tpserve.shutdown_trace import trace

        go = threading.Barrier(8)

        def writer(i):
            go.wait()
            for n in range(200):
                trace("worker", "spam", writer=i, n=n, payload=str(i) * 500)

        threads = [threading.Thread(target=writer, args=(i,), name=f"w{i}") for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        """,
        TPSERVE_SHUTDOWN_TRACE_DIR=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    (path,) = tmp_path.glob("*.log")
    assert len(path.read_bytes().split(b"\n")) == 8 * 200 + 1
    events = trace_lines(tmp_path)
    assert len(events) == 8 * 200 and not [e for e in trace_view.load(tmp_path) if e.dump is not None]
    seen: dict[str, list[int]] = {}
    for e in events:
        i = e.fields["writer"]
        assert e.thread == f"w{i}" and e.fields["payload"] == repr(i * 500)
        seen.setdefault(i, []).append(int(e.fields["n"]))
    assert seen == {str(i): list(range(200)) for i in range(8)}


def test_watchdog_dumps_stacks_and_exits_on_overrun(tmp_path: Path) -> None:
    proc = run_py(
        """
        import time
        from tpserve.shutdown_trace import phase_timer

        def hang_in_drain():
            time.sleep(30)

        with phase_timer("worker", "drain", timeout=0.5, exit_code=3, active=2):
            hang_in_drain()
        """,
        TPSERVE_SHUTDOWN_TRACE_DIR=str(tmp_path),
    )
    events = trace_view.load(tmp_path)
    elapsed = time.time() - events[0].wall  # from the phase's begin, whatever the start-up cost
    assert proc.returncode == 3 and elapsed < 5, (proc.returncode, elapsed, proc.stderr)
    assert [e.phase for e in events] == ["drain begin", "drain OVERRUN", "stack dump"]
    assert events[0].fields == {"timeout": "0.5", "active": "2"}
    assert events[1].fields["owner"] == "'MainThread'" and events[1].fields["exit"] == "3"
    assert "in hang_in_drain" in (events[2].dump or "")


def test_watchdog_without_exit_reports_once_and_lets_the_phase_finish(tmp_path: Path) -> None:
    """The timer thread reports the overrun and disarms faulthandler's backstop (due at 1.2 s)."""
    proc = run_py(
        """
        import time
        from tpserve.shutdown_trace import phase_timer

        with phase_timer("proxy", "reap", timeout=0.2):
            time.sleep(1.4)
        """,
        TPSERVE_SHUTDOWN_TRACE_DIR=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    events = trace_view.load(tmp_path)
    assert [e.phase for e in events] == ["reap begin", "reap OVERRUN", "stack dump", "reap end"]
    assert events[1].fields["exit"] == "None" and float(events[3].fields["duration_ms"]) >= 1400


def test_watchdog_backstop_fires_while_c_code_holds_the_gil(tmp_path: Path) -> None:
    """Catastrophic regex backtracking never releases the GIL: only faulthandler's C thread can act."""
    proc = run_py(
        """
        import re
        from tpserve.shutdown_trace import phase_timer

        def spin_in_c():
            re.match(r"(a+)+$", "a" * 64 + "b")

        with phase_timer("proxy", "join", timeout=0.5, exit_code=3):
            spin_in_c()
        """,
        TPSERVE_SHUTDOWN_TRACE_DIR=str(tmp_path),
    )
    assert proc.returncode == 1, proc.stderr  # faulthandler's _exit(1)
    events = trace_view.load(tmp_path)
    assert [e.phase for e in events] == ["join begin", "stack dump"]
    assert (events[1].dump or "").startswith("Timeout (") and "in spin_in_c" in (events[1].dump or "")


# A process of the trace_view test: once every process is up, sleep until start + offset and trace;
# HANG hangs in a phase until the watchdog ends the process.
SCRIPTED = """
import json, sys, time
from tpserve.shutdown_trace import phase_timer, trace

steps = json.loads(sys.argv[1])
print("ready", flush=True)
start = float(sys.stdin.readline())

def hang_in_drain():
    time.sleep(30)

for offset, component, phase in steps:
    time.sleep(max(0.0, start + offset - time.time()))
    if phase == "HANG":
        with phase_timer(component, "drain", timeout=0.3, exit_code=70):
            hang_in_drain()
    trace(component, phase)
"""


def test_trace_view_merges_and_names_the_unfinished_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plans = {
        "-": [(0.0, "proxy", "shutdown"), (0.3, "proxy", "wait_workers"), (0.9, "proxy", "exit")],
        "0": [(0.1, "worker", "recv_sentinel"), (0.4, "executor_loop", "drain"), (0.6, "worker", "exit")],
        "1": [(0.2, "worker", "recv_sentinel"), (0.5, "executor_loop", "HANG")],
    }
    procs = {}
    for rank, steps in plans.items():
        env = {k: v for k, v in os.environ.items() if k not in TRACE_ENV}
        env.update(PYTHONPATH=str(REPO), TPSERVE_SHUTDOWN_TRACE_DIR=str(tmp_path))
        if rank != "-":
            env["TPSERVE_RANK"] = rank
        procs[rank] = subprocess.Popen(
            [sys.executable, "-c", SCRIPTED, json.dumps(steps)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for p in procs.values():
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    start = time.time() + 0.1
    for p in procs.values():
        assert p.stdin is not None
        p.stdin.write(f"{start}\n")
        p.stdin.flush()
    stderr = {rank: p.communicate(timeout=15)[1] for rank, p in procs.items()}
    codes = {rank: p.returncode for rank, p in procs.items()}
    assert codes == {"-": 0, "0": 0, "1": 70}, stderr

    assert trace_view.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out

    merged = trace_view.merge(trace_view.load(tmp_path))
    scheduled = [(e.rank, e.phase) for e in merged if " " not in e.phase]
    expected = sorted((off, rank, phase) for rank, steps in plans.items() for off, _, phase in steps)
    assert scheduled == [(rank, phase) for _, rank, phase in expected if phase != "HANG"]
    overrun = next(i for i, e in enumerate(merged) if e.phase == "drain OVERRUN")
    assert merged[overrun + 1].phase == "stack dump" and merged[overrun - 1].phase != "stack dump"

    pid = {e.rank: e.pid for e in merged}
    host = merged[0].host
    assert re.search(
        rf"^UNFINISHED {re.escape(host)}:{pid['1']} rank 1: last phase executor_loop/drain OVERRUN at \+\d+\.\d ms$",
        out,
        re.M,
    ), out
    assert f"FINISHED {host}:{pid['0']} rank 0: worker/exit" in out
    assert f"FINISHED {host}:{pid['-']} rank -: proxy/exit" in out
    assert "in hang_in_drain" in out

    page = (tmp_path / "timeline.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page
    for rank in plans:
        assert f"{host}:{pid[rank]} rank {rank}" in page

    assert trace_view.main([str(tmp_path / "empty"), "--no-html"]) == 2


def test_a_rank_killed_by_sigterm_while_starting_traces_its_exit(tmp_path: Path) -> None:
    """SIGTERM to a rank that is still loading: it traces the signal and its exit, then dies of it."""
    from helpers import built_model

    from tpserve.proxy.launcher import mpi_environment, mpirun_path, session_pids

    env = mpi_environment(1, {k: v for k, v in os.environ.items() if k not in TRACE_ENV})
    env["TPSERVE_SHUTDOWN_TRACE_DIR"] = str(tmp_path)
    cmd = [mpirun_path(), "-n", "1", sys.executable, "-m", "mpi4py", "-m", "tpserve.worker",
           "--model", str(built_model("llama")), "--connection-file", str(tmp_path / "engine.json")]
    mpirun = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not any(e.phase == "start" for e in trace_view.load(tmp_path)):
            assert mpirun.poll() is None and time.monotonic() < deadline, "the rank never started"
            time.sleep(0.01)
        (rank,) = {e.pid for e in trace_view.load(tmp_path)}
        os.kill(rank, 15)
        mpirun.communicate(timeout=30)
    finally:
        for pid in session_pids(mpirun.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        mpirun.wait(10)
    events = [e for e in trace_lines(tmp_path) if e.pid == rank]
    assert [(e.phase, e.fields) for e in events[-2:]] == [("signal", {"signum": "15"}), ("exit", {"code": "-15"})]
    assert not (tmp_path / "engine.json").exists()  # it never got as far as writing one
    (verdict,) = trace_view.verdicts(events)
    assert verdict.finished

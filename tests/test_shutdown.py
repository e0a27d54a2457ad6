"""Shutdown you can trust: real processes, really killed; every request ends; no process is left."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
from helpers import ROOT, built_model

from tpserve import LLM, EngineDeadError, SamplingParams
from tpserve.proxy.launcher import session_pids
from tpserve.trace_view import load
from tpserve.trace_view import main as trace_main

LONG = SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)


def wait_gone(sid: int, timeout: float) -> float:
    start = time.monotonic()
    while session_pids(sid):
        assert time.monotonic() - start < timeout, f"left behind: {session_pids(sid)}"
        time.sleep(0.05)
    return time.monotonic() - start


def ranks_of(llm: LLM) -> dict[int, psutil.Process]:
    out = {}
    for p in psutil.Process(llm.workers.pid).children(recursive=True):
        if "tpserve.worker" in " ".join(p.cmdline()):
            out[int(p.environ()["OMPI_COMM_WORLD_RANK"])] = p
    return out


def engine(**kw) -> LLM:
    return LLM(model=str(built_model("llama")), tensor_parallel_size=2, max_seq_len=2100, max_batch_size=8, **kw)


def assert_no_bound_expired(trace_dir: Path) -> None:
    """The proxy's shutdown waited out none of its bounds (the goodbye, the workers' exit): checked in its
    trace, so a slow machine cannot fail it and a shutdown that met a bound cannot pass."""
    lines = [line for p in trace_dir.glob("*.log") for line in p.read_text(errors="replace").splitlines()]
    waits = [line.split("\t", 8)[-1] for line in lines if "\tproxy\twait_" in line]
    assert waits and not any("outcome=timeout" in w for w in waits), waits


@pytest.mark.parametrize("victim", [0, 1])
def test_a_killed_rank_fails_pending_requests_and_leaves_nothing(victim, tmp_path, monkeypatch):
    monkeypatch.setenv("TPSERVE_SHUTDOWN_TRACE_DIR", str(tmp_path))
    llm = engine()
    sid = llm.workers.pid
    streams = [llm.generate_stream([3, 4, 5 + i], LONG) for i in range(4)]
    next(streams[0])
    start = time.monotonic()
    ranks_of(llm)[victim].kill()
    for s in streams:
        out = s.result(timeout=60)
        assert out.finish_reason == "error"
        assert "EngineDeadError" in out.error and f"rank {victim}" in out.error and "signal 9" in out.error, out.error
    # Seen by mpirun's exit (0.6 s here), not by a silence or send bound (30 s): a margin a loaded machine holds.
    assert time.monotonic() - start < 20
    with pytest.raises(EngineDeadError):
        llm.generate([[1, 2]])
    llm.shutdown()
    assert_no_bound_expired(tmp_path)
    wait_gone(sid, 10)


def test_an_exception_in_one_ranks_loop_is_reported_with_its_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("TPSERVE_SHUTDOWN_TRACE_DIR", str(tmp_path))
    os.environ["TPSERVE_FAULT_RAISE"] = "1:5"
    try:
        llm = engine()
    finally:
        del os.environ["TPSERVE_FAULT_RAISE"]
    sid = llm.workers.pid
    out = llm.generate([[7, 8, 9]], LONG)[0]
    assert out.finish_reason == "error"
    assert "rank 1" in out.error and "injected fault at iteration 5" in out.error, out.error
    llm.shutdown()
    assert_no_bound_expired(tmp_path)
    wait_gone(sid, 10)


def test_shutdown_ends_every_in_flight_stream(tmp_path, monkeypatch):
    monkeypatch.setenv("TPSERVE_SHUTDOWN_TRACE_DIR", str(tmp_path))
    llm = engine()
    sid = llm.workers.pid
    ends: dict[int, tuple] = {}

    def consume(i: int) -> None:
        chunks = list(llm.generate_stream([5, 6, i + 1], LONG))
        ends[i] = (chunks[-1].finished, chunks[-1].finish_reason, sum(len(c.token_ids) for c in chunks))

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(24)]  # more than the 8 slots
    for t in threads:
        t.start()
    time.sleep(0.5)
    llm.shutdown()
    assert_no_bound_expired(tmp_path)
    for t in threads:
        t.join(30)
    assert len(ends) == 24 and all(fin and reason == "abort" for fin, reason, _ in ends.values()), ends
    wait_gone(sid, 5)


def test_drain_lets_pending_requests_finish():
    """Also: a spawned engine talks over Unix sockets in a directory of its own user's only, gone after."""
    llm = engine()
    ipc_dir = llm.client.conn.request_addr.removeprefix("ipc://").rsplit("/", 1)[0]
    assert llm.client.conn.response_addr == f"ipc://{ipc_dir}/responses"
    assert stat.S_IMODE(os.stat(ipc_dir).st_mode) == 0o700
    streams = [llm.generate_stream([5, 6, i + 1], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
               for i in range(12)]
    llm.shutdown(drain=True, timeout=60)
    assert [s.output.finish_reason for s in streams] == ["length"] * 12
    assert all(len(s.output.token_ids) == 30 for s in streams)
    assert not os.path.exists(ipc_dir)


PROXY_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from tpserve import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], tensor_parallel_size=2, max_seq_len=2100)
    print(json.dumps({"mpirun": llm.workers.pid}), flush=True)
    stream = llm.generate_stream([1, 2, 3], SamplingParams(max_tokens=2000, ignore_eos=True))
    for chunk in stream:
        pass
""")


def test_workers_exit_when_the_proxy_is_killed(tmp_path):
    env = dict(os.environ, TPSERVE_SHUTDOWN_TRACE_DIR=str(tmp_path))
    proxy = subprocess.Popen([sys.executable, "-c", PROXY_SCRIPT, str(built_model("llama"))], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        sid = json.loads(proxy.stdout.readline())["mpirun"]
        assert session_pids(sid)
        time.sleep(0.5)
        proxy.kill()
        proxy.wait(5)
        took = wait_gone(sid, 10)
        assert took < 10
    finally:
        if proxy.poll() is None:
            proxy.kill()
    # Rank 0 saw the proxy exit through its pidfd, not after the proxy's heartbeats fell silent.
    assert_in_order(phases_by_process(tmp_path)[0], ["worker/owner_exited", "worker/proxy_lost"], "rank 0")


EXPECTED_PHASES = {
    "proxy": ["proxy/start", "proxy/ready", "proxy/shutdown begin", "proxy/sentinel", "proxy/goodbye_received",
              "proxy/wait_goodbye", "proxy/pending_aborted", "proxy/wait_workers", "proxy/dispatcher_exit",
              "proxy/dispatcher_joined", "proxy/sockets_closed", "proxy/mpirun_reaped", "proxy/exit"],
    0: ["worker/start", "worker/ready", "worker/sentinel_received", "request_queue/shutdown_enqueued",
        "executor_loop/sentinel_seen", "executor_loop/drain", "executor_loop/loop_exit",
        "executor_loop/thread_joined", "worker/cleanup begin", "worker/proxy_threads_told_to_quit",
        "worker/sockets_closed", "worker/torch_distributed_destroyed", "worker/communicators_destroyed",
        "worker/cleanup end", "worker/exit"],
    1: ["worker/start", "worker/ready", "executor_loop/sentinel_seen", "executor_loop/drain",
        "executor_loop/loop_exit", "executor_loop/thread_joined", "worker/cleanup begin",
        "worker/torch_distributed_destroyed", "worker/communicators_destroyed", "worker/cleanup end", "worker/exit"],
}


def phases_by_process(trace_dir: Path) -> dict:
    by = {}
    for e in load(trace_dir):
        if e.component == "faulthandler":
            continue
        key = "proxy" if e.rank == "-" else int(e.rank)
        by.setdefault(key, []).append(f"{e.component}/{e.phase}")
    return by


def assert_in_order(seen: list[str], expected: list[str], who) -> None:
    pos = -1
    for phase in expected:
        assert phase in seen[pos + 1:], f"{who}: {phase} missing after position {pos} in {seen}"
        pos = seen.index(phase, pos + 1)


def test_every_phase_is_traced_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("TPSERVE_SHUTDOWN_TRACE_DIR", str(tmp_path))
    llm = engine()
    streams = [llm.generate_stream([1, 2, i], LONG) for i in range(3)]
    next(streams[0])
    llm.shutdown()
    by = phases_by_process(tmp_path)
    for who, expected in EXPECTED_PHASES.items():
        assert who in by, f"no trace of {who}: {list(by)}"
        assert_in_order(by[who], expected, who)
    assert trace_main([str(tmp_path), "--no-html"]) == 0  # every process reached its exit


TEARDOWN_SCRIPT = textwrap.dedent("""
    import logging, sys
    from tpserve import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], tensor_parallel_size=2, max_seq_len=64)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4))
    logging.disable(logging.CRITICAL)
    logging.shutdown()
    # no shutdown(): the interpreter's exit must do it, and trace it
""")


def test_shutdown_at_interpreter_exit_is_traced(tmp_path):
    env = dict(os.environ, TPSERVE_SHUTDOWN_TRACE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", TEARDOWN_SCRIPT, str(built_model("llama"))], cwd=ROOT, env=env,
                       timeout=60, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    by = phases_by_process(tmp_path)
    assert_in_order(by["proxy"], EXPECTED_PHASES["proxy"], "proxy")
    assert_in_order(by[1], EXPECTED_PHASES[1], "rank 1")


CTRL_C_SCRIPT = textwrap.dedent("""
    import json, sys
    from tpserve import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], tensor_parallel_size=2, max_seq_len=2100)
    print(json.dumps({"mpirun": llm.workers.pid}), flush=True)
    llm.generate([[1, 2, i] for i in range(4)], SamplingParams(max_tokens=2000, ignore_eos=True))
""")


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_generate(tmp_path, presses):
    env = dict(os.environ, TPSERVE_SHUTDOWN_TRACE_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_SCRIPT, str(built_model("llama"))], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        sid = json.loads(proc.stdout.readline())["mpirun"]
        time.sleep(1.0)
        if presses == 2:  # wedged workers: shutdown would wait out every bound; the second press forces
            for pid in session_pids(sid):
                if pid != sid:
                    os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        if presses == 2:
            deadline = time.monotonic() + 10
            while "shutdown begin" not in "".join(p.read_text() for p in tmp_path.glob("*.log")):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            proc.send_signal(signal.SIGINT)
        proc.wait(30)
        # forced: well under the 10 s that an unforced shutdown of stopped workers waits for their goodbye
        assert presses == 1 or time.monotonic() - start < 9
        assert "KeyboardInterrupt" in proc.stderr.read()
        wait_gone(sid, 5)
        if presses == 2:
            assert "proxy\tforced" in "".join(p.read_text() for p in tmp_path.glob("*.log"))
        else:
            assert_no_bound_expired(tmp_path)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_wedged_rank_shows_in_the_trace_with_its_peers_stacks(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TPSERVE_SHUTDOWN_TRACE_DIR", str(tmp_path))
    monkeypatch.setenv("TPSERVE_SHUTDOWN_TIMEOUT", "2")
    llm = engine()
    sid = llm.workers.pid
    stream = llm.generate_stream([1, 2, 3], LONG)
    next(stream)
    ranks = ranks_of(llm)
    os.kill(ranks[1].pid, signal.SIGSTOP)  # rank 1 goes quiet: rank 0 hangs in the next collective
    start = time.monotonic()
    llm.shutdown()
    # every bound expired in turn (goodbye 10 s, workers 10 s, SIGTERM 5 s), then SIGKILL of the session: 30 s
    # of bounds, with a margin a loaded machine holds
    assert time.monotonic() - start < 60
    wait_gone(sid, 10)
    capsys.readouterr()
    # mpirun may resume the stopped rank while it forwards SIGTERM (then all end late) or not (SIGKILL)
    assert trace_main([str(tmp_path), "--no-html"]) in (0, 1)
    report = capsys.readouterr().out
    assert "stack dump from" in report and "rank 0" in report, report
    rank0_log = next(p.read_text() for p in tmp_path.glob("*.log") if f".{ranks[0].pid}.log" in p.name)
    assert "sentinel_to_exit OVERRUN" in rank0_log
    assert 'File "' in rank0_log and "executor" in rank0_log  # the loop thread's stack, where it waits

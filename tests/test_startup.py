"""A worker that cannot start makes LLM(...) raise its error quickly and leaves no process behind."""

import time

import pytest
from helpers import built_model, worker_processes

from tpserve import LLM, ModelNotFoundError, WorkerStartupError, trace_view


def assert_no_workers_left():
    deadline = time.monotonic() + 10
    while worker_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not worker_processes(), [p.cmdline() for p in worker_processes()]


def test_missing_model_directory(tmp_path):
    """Found missing by the proxy, before any worker is launched."""
    with pytest.raises(ModelNotFoundError, match=f"model directory {tmp_path / 'no-such-model'} does not exist"):
        LLM(model=str(tmp_path / "no-such-model"), tensor_parallel_size=2)
    assert not worker_processes()


def test_a_directory_without_a_model_fails_on_the_workers(tmp_path):
    start = time.monotonic()
    with pytest.raises(WorkerStartupError, match="config.json|does not exist|not found") as err:
        LLM(model=str(tmp_path), tensor_parallel_size=2)
    assert time.monotonic() - start < 60
    assert "rank" in str(err.value)
    assert_no_workers_left()


def test_tp_that_does_not_divide_heads():
    model = built_model("llama")  # 4 heads, 2 KV heads
    start = time.monotonic()
    with pytest.raises(WorkerStartupError, match="tensor_parallel_size=3 does not divide"):
        LLM(model=str(model), tensor_parallel_size=3)
    assert time.monotonic() - start < 60
    assert_no_workers_left()


def test_bad_engine_options_raise_before_launch():
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="max_batch_size"):
        LLM(max_batch_size=0)


def test_a_failed_start_traces_every_process_exit(tmp_path, monkeypatch, capsys):
    """TP 2 on the default model (9 heads): both ranks exit with code 1, and the trace says so
    instead of calling them UNFINISHED."""
    monkeypatch.setenv("TPSERVE_SHUTDOWN_TRACE_DIR", str(tmp_path))
    with pytest.raises(WorkerStartupError, match="tensor_parallel_size=2 does not divide"):
        LLM(tensor_parallel_size=2)
    assert_no_workers_left()
    monkeypatch.delenv("TPSERVE_SHUTDOWN_TRACE_DIR")
    results = trace_view.verdicts(trace_view.merge(trace_view.load(tmp_path)))
    assert sorted(v.rank for v in results) == ["-", "0", "1"]
    assert all(v.finished for v in results), [(v.rank, v.last.phase) for v in results]
    ranks = [v for v in results if v.rank != "-"]
    assert [(v.last.phase, v.last.fields) for v in ranks] == [("exit", {"code": "1"})] * 2
    assert trace_view.main([str(tmp_path), "--no-html"]) == 0
    out = capsys.readouterr().out
    assert "UNFINISHED" not in out and out.count("worker/exit code=1 at") == 2


def test_engine_warnings_reach_the_users_stderr(capfd):
    """Rank 0's warnings are the user's to read: they reach this process's stderr, not only a log that is
    deleted at shutdown."""
    with LLM(model=str(built_model("llama")), max_seq_len=256, kv_cache_tokens=64) as llm:
        assert llm.info["kv_cache_tokens"] < 256
    err = capfd.readouterr().err
    assert "the KV cache pool holds 64 tokens, fewer than max_seq_len=256" in err, err[-2000:]


def test_a_launcher_that_cannot_open_its_pmix_listener_is_launched_once_more(tmp_path, monkeypatch):
    """Open MPI's mpirun sometimes exits at start-up (code 213) because its PMIx server found no usable
    interface for its listener ("ptl_tool: problems getting address for index 0", a transient seen in CI).
    Restricting PMIx to an interface that does not exist makes that failure real and lasting: the proxy
    launches mpirun a second time, once, and then reports the launcher's own words."""
    monkeypatch.setenv("TPSERVE_SHUTDOWN_TRACE_DIR", str(tmp_path))
    monkeypatch.setenv("PMIX_MCA_ptl_tcp_if_include", "tpserve-no-such-if0")
    start = time.monotonic()
    with pytest.raises(WorkerStartupError) as err:
        LLM(model=str(built_model("llama")), tensor_parallel_size=1)
    assert time.monotonic() - start < 60
    text = str(err.value)
    assert "before they were ready" in text and "launched twice" in text, text
    assert text.count("no available\ninterfaces were found") == 2 or text.count("tool connections") == 2, text
    assert_no_workers_left()
    monkeypatch.delenv("TPSERVE_SHUTDOWN_TRACE_DIR")
    events = trace_view.merge(trace_view.load(tmp_path))
    relaunches = [e for e in events if e.phase == "mpirun_relaunch"]
    assert len(relaunches) == 1, [e.phase for e in events]

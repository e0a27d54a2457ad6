"""Attach mode: the user starts the workers with mpirun; the proxy attaches through a connection file,
which is created exclusively (mode 0600), removed at shutdown, and, left behind by a dead engine, fails
an attach fast and a new engine's start."""

import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest
from helpers import built_model, hf_greedy, kill_session, launch_logged, listener_failed

from tpserve import LLM, SamplingParams, WorkerStartupError, wire
from tpserve.proxy.launcher import mpi_environment, mpirun_path


class Workers:
    """``mpirun -n N python -m tpserve.worker ... --connection-file FILE`` in a session of its own."""

    def __init__(self, tmp_path: Path, conn: Path, n: int, name: str, mpirun_args: tuple[str, ...] = (),
                 worker_args: tuple[str, ...] = ()) -> None:
        self.cmd = [mpirun_path(), *mpirun_args, "-n", str(n), sys.executable, "-m", "mpi4py", "-m", "tpserve.worker",
                    "--model", str(built_model("qwen3")), "--max-seq-len", "64", "--connection-file", str(conn),
                    *worker_args]
        self.log_path = tmp_path / f"{name}.log"
        self.env = mpi_environment(n)
        self.popen = launch_logged(self.cmd, self.env, self.log_path)
        self.relaunched = False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, conn: Path, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not conn.exists():
            if not self.relaunched and listener_failed(self.popen, self.log_path):
                self.relaunched, self.popen = True, launch_logged(self.cmd, self.env, self.log_path)
            assert self.popen.poll() is None, self.log()
            assert time.monotonic() < deadline, "no connection file"
            time.sleep(0.1)

    def wait(self, timeout: float = 60) -> int:
        return self.popen.wait(timeout)

    def kill(self) -> None:
        """kill -9 of mpirun and every rank."""
        kill_session(self.popen)


@pytest.fixture
def launched():
    started: list[Workers] = []
    yield lambda *a: started.append(Workers(*a)) or started[-1]
    for w in started:
        w.kill()


def test_attach_then_shutdown_removes_the_file(tmp_path, launched):
    conn = tmp_path / "engine.json"
    workers = launched(tmp_path, conn, 2, "a")
    workers.wait_for(conn)
    assert stat.S_IMODE(os.stat(conn).st_mode) == 0o600
    assert "key" not in " ".join(workers.cmd)
    written = conn.read_bytes()

    # A second engine on the same path refuses to start, and leaves the live engine's file alone.
    second = launched(tmp_path, conn, 1, "b")
    assert second.wait(60) == 1
    assert f"connection file {conn} already exists" in second.log()
    assert conn.read_bytes() == written

    model = built_model("qwen3")
    with LLM(connect=str(conn)) as llm:
        assert llm.info["tensor_parallel_size"] == 2
        p = [11, 22, 33, 44]
        out = llm.generate([p], SamplingParams(max_tokens=8, temperature=0))[0]
        assert out.token_ids == hf_greedy(model, p, 8)
        assert llm.tokenizer is not None and out.text == llm.tokenizer.decode(out.token_ids)
    assert workers.wait(30) == 0, workers.log()  # the sentinel ended them
    assert not conn.exists()


def test_sigterm_ends_attached_workers_and_removes_the_file(tmp_path, launched):
    conn = tmp_path / "engine.json"
    workers = launched(tmp_path, conn, 1, "a")
    workers.wait_for(conn)
    workers.popen.send_signal(signal.SIGTERM)  # mpirun passes it on to the ranks
    workers.wait(30)
    assert not conn.exists(), workers.log()


def test_stale_file_fails_attach_fast_and_blocks_a_new_engine(tmp_path, launched):
    conn = tmp_path / "engine.json"
    workers = launched(tmp_path, conn, 1, "a")
    workers.wait_for(conn)
    workers.kill()  # kill -9: nothing can remove the file now
    assert conn.exists()

    start = time.monotonic()
    with pytest.raises(WorkerStartupError, match="no engine answered .* the file is stale"):
        LLM(connect=str(conn))
    assert time.monotonic() - start < 60  # within the 10 s attach bound (plus a loaded machine), not the 300 s start

    second = launched(tmp_path, conn, 1, "b")
    assert second.wait(60) == 1
    assert f"connection file {conn} already exists" in second.log()


def test_connection_file_is_created_exclusively_and_private(tmp_path):
    info = wire.ConnectionInfo("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", wire.new_key())
    path = tmp_path / "engine.json"
    old = os.umask(0)  # a permissive umask must not widen the mode
    try:
        info.write(str(path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    other = wire.ConnectionInfo("tcp://127.0.0.1:3", "tcp://127.0.0.1:4", wire.new_key())
    with pytest.raises(FileExistsError, match="already exists"):
        other.write(str(path))
    assert wire.ConnectionInfo.read(str(path)) == info
    assert not other.remove(str(path)) and path.exists()  # not its file
    assert info.remove(str(path)) and not path.exists()

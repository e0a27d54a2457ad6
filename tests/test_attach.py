"""Attach mode: the user starts the workers with mpirun; the proxy attaches through a connection file."""

import os
import signal
import stat
import subprocess
import sys
import time

from helpers import ROOT, built_model, hf_greedy

from tpserve import LLM, SamplingParams
from tpserve.proxy.launcher import mpi_environment, mpirun_path


def test_attach_through_connection_file(tmp_path):
    model = built_model("qwen3")
    conn = tmp_path / "engine.json"
    cmd = [mpirun_path(), "-n", "2", sys.executable, "-m", "mpi4py", "-m", "tpserve.worker",
           "--model", str(model), "--max-seq-len", "64", "--connection-file", str(conn)]
    log = open(tmp_path / "workers.log", "wb")  # noqa: SIM115
    workers = subprocess.Popen(cmd, cwd=ROOT, env=mpi_environment(2), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not conn.exists():
            assert workers.poll() is None, (tmp_path / "workers.log").read_text()
            assert time.monotonic() < deadline, "no connection file"
            time.sleep(0.1)
        assert stat.S_IMODE(os.stat(conn).st_mode) == 0o600
        assert "key" not in " ".join(cmd)
        with LLM(connect=str(conn)) as llm:
            assert llm.info["tensor_parallel_size"] == 2
            p = [11, 22, 33, 44]
            out = llm.generate([p], SamplingParams(max_tokens=8, temperature=0))[0]
            assert out.token_ids == hf_greedy(model, p, 8)
            assert llm.tokenizer is not None and out.text == llm.tokenizer.decode(out.token_ids)
        assert workers.wait(30) == 0, (tmp_path / "workers.log").read_text()  # the sentinel ended them
    finally:
        if workers.poll() is None:
            os.killpg(workers.pid, signal.SIGKILL)
            workers.wait(10)
        log.close()

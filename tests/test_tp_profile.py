"""scripts/gpu_tp_profile.py at TP 2 on CPU (gloo): the profile finds every collective of a decode step (the
embedding's all-reduce, two per layer, the LM head's all-gather), so on a GPU it measures them all."""

import json
import subprocess
import sys

from helpers import ROOT, built_model

from tpserve.model import ModelConfig
from tpserve.proxy.launcher import mpi_environment, mpirun_path


def test_profile_counts_every_collective_of_a_decode_step(tmp_path):
    model = built_model("qwen3")
    out = tmp_path / "profile.json"
    cmd = [mpirun_path(), "-n", "2", sys.executable, "-m", "mpi4py", str(ROOT / "scripts" / "gpu_tp_profile.py"),
           str(model), "--device", "cpu", "--batch", "2", "--warm-steps", "3", "--steps", "4", "--profile-steps", "3", "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=mpi_environment(2), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    layers = ModelConfig.from_dir(str(model)).num_layers
    (decode,) = report["decode"]
    assert report["tp"] == 2 and decode["batch"] == 2
    assert decode["collectives_per_step"] == 1 + 2 * layers + 1
    assert len(decode["collective_ms_per_step_by_rank"]) == 2
    assert all(ms > 0 for ms in decode["collective_ms_per_step_by_rank"])

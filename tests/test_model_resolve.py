"""The model is found by the proxy before anything is launched: a local directory (``~`` expanded), or a
Hugging Face hub id through huggingface_hub's cache (offline here: HF_HUB_OFFLINE=1); one clear error,
before mpirun, when it is neither."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

from helpers import ROOT, built_model

from tpserve import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def test_a_tilde_path_is_expanded(tmp_path, monkeypatch):
    model = built_model("llama")
    (tmp_path / "models").mkdir()
    os.symlink(model, tmp_path / "models" / "tiny")
    monkeypatch.setenv("HOME", str(tmp_path))
    with LLM("~/models/tiny", max_seq_len=64) as llm:
        assert llm.engine_args.model == str(tmp_path / "models" / "tiny")
        assert len(llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].token_ids) == 4


SCRIPT = textwrap.dedent("""
    import json, sys, time
    from tpserve import LLM, SamplingParams
    from tpserve.proxy.launcher import WorkerProcess
    launched = []
    real_init = WorkerProcess.__init__
    def counting_init(self, *a, **k):  # counts launches, then launches for real
        launched.append(1)
        real_init(self, *a, **k)
    WorkerProcess.__init__ = counting_init
    result = {}
    with LLM(sys.argv[1], max_seq_len=64) as llm:
        result["model"] = llm.engine_args.model
        result["tokens"] = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True),
                                        use_tqdm=False)[0].token_ids
    result["launches"] = len(launched)
    start = time.monotonic()
    try:
        LLM("tpserve-test/no-such-model")
    except Exception as e:
        result["error"] = [type(e).__name__, str(e), round(time.monotonic() - start, 2)]
    result["launches_after"] = len(launched)
    print(json.dumps(result))
""")


def fake_hub_cache(root, repo: str, files_from) -> str:
    """huggingface_hub's cache layout (models--org--name/refs/main, snapshots/<commit>/...), filled by hand
    since this machine has no network: the real library reads it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    shutil.copytree(files_from, base / "snapshots" / commit)
    return str(base / "snapshots" / commit)


def test_a_hub_id_resolves_through_the_local_cache_and_an_unknown_one_fails_before_launch(tmp_path):
    snapshot = fake_hub_cache(tmp_path / "hub", "tpserve-test/tiny-llama", built_model("llama"))
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    r = subprocess.run([sys.executable, "-c", SCRIPT, "tpserve-test/tiny-llama"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(r.stdout.splitlines()[-1])
    assert os.path.realpath(result["model"]) == os.path.realpath(snapshot)
    assert len(result["tokens"]) == 4 and result["launches"] == 1
    kind, message, _ = result["error"]
    assert kind == "ModelNotFoundError", result["error"]
    assert "tpserve-test/no-such-model" in message and "Hugging Face" in message, message
    assert result["launches_after"] == 1  # no mpirun for a model that is nowhere


def test_workers_started_by_hand_resolve_a_hub_id_too(tmp_path):
    """Attach mode: ``mpirun ... tpserve.worker --model org/name`` finds the model in its host's cache."""
    from helpers import kill_session

    from tpserve.proxy.launcher import mpi_environment, mpirun_path

    fake_hub_cache(tmp_path / "hub", "tpserve-test/tiny-llama", built_model("llama"))
    conn = tmp_path / "engine.json"
    env = mpi_environment(1) | {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    cmd = [mpirun_path(), "-n", "1", sys.executable, "-m", "mpi4py", "-m", "tpserve.worker", "--model",
           "tpserve-test/tiny-llama", "--max-seq-len", "64", "--connection-file", str(conn)]
    with open(tmp_path / "workers.log", "wb") as log:
        workers = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not conn.exists():
            assert workers.poll() is None and time.monotonic() < deadline, (tmp_path / "workers.log").read_text()
            time.sleep(0.1)
        with LLM(connect=str(conn)) as llm:
            assert len(llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].token_ids) == 4
        assert workers.wait(30) == 0
    finally:
        if workers.poll() is None:
            kill_session(workers)

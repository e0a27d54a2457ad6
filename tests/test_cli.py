"""The command line as a user runs it: make-model, generate (streamed), trace."""

import subprocess
import sys

from helpers import ROOT, built_model, hf_greedy

from tpserve.proxy.tokenizer import Tokenizer


def tpserve(*args: str, timeout: float = 120, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tpserve.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_make_model_then_generate(tmp_path):
    r = tpserve("make-model", str(tmp_path / "m"), "--arch", "qwen2", "--size", "tiny")
    assert r.returncode == 0, r.stderr
    model = tmp_path / "m"
    assert (model / "config.json").exists() and (model / "tokenizer.json").exists()
    r = tpserve("generate", "Hello there", "--model", str(model), "--tp", "2", "--max-tokens", "6")
    assert r.returncode == 0, r.stderr
    tok = Tokenizer(model)
    expected = hf_greedy(model, tok.encode("Hello there"), 6)
    assert r.stdout.rstrip("\n") == tok.decode(expected)
    assert "tokens in" in r.stderr and "finish_reason=" in r.stderr


def test_generate_chat_on_the_default_model():
    r = tpserve("generate", "What is the capital of France?", "--chat", "--max-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_trace_command_merges_a_real_shutdown(tmp_path):
    import os

    traces = tmp_path / "trace"
    env = dict(os.environ, TPSERVE_SHUTDOWN_TRACE_DIR=str(traces))
    r = tpserve("generate", "Hi", "--model", str(built_model("llama")), "--tp", "2", "--max-tokens", "3", env=env)
    assert r.returncode == 0, r.stderr
    assert len(list(traces.glob("*.log"))) == 3  # the proxy and two ranks
    r = tpserve("trace", str(traces))
    assert r.returncode == 0, r.stdout + r.stderr  # every process reached its exit
    assert "mpirun_reaped" in r.stdout and "communicators_destroyed" in r.stdout
    assert (traces / "timeline.html").exists()
    (tmp_path / "empty").mkdir()
    assert tpserve("trace", str(tmp_path / "empty")).returncode == 2

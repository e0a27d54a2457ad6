"""Shared test tools: models built once per machine, Hugging Face references, bounded process runs."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from functools import cache
from pathlib import Path

import psutil

from tpserve.proxy.launcher import mpi_environment

ROOT = Path(__file__).resolve().parent.parent


@cache
def built_model(arch: str, size: str = "tiny", tokenizer: bool = True) -> Path:
    """A random-weight model of a real architecture, built once into the cache (deterministic seed)."""
    from tpserve.model.default_model import cache_dir, default_model_path
    from tpserve.model.random_model import make_model

    path = cache_dir() / "test-models" / f"{arch}-{size}-{'tok' if tokenizer else 'notok'}-v1"
    if not (path / "config.json").exists():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        make_model(tmp, arch, size=size, seed=1234, tokenizer_dir=default_model_path() if tokenizer else None)
        try:
            os.rename(tmp, path)
        except OSError:  # another process won the race
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return path


@cache
def _hf_model(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from Hugging Face transformers on the same weights (float32, CPU): the reference.
    Generation stops at the model's EOS like ours does; the EOS token itself is included."""
    import torch

    model = _hf_model(str(model_dir))
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
        )
    return out[0, len(prompt_ids):].tolist()


def run_group(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs ``cmd`` in its own session; on timeout kills every process of that session (Open MPI 5 gives each
    rank a process group of its own, so killing mpirun's group would orphan the ranks). An mpirun whose PMIx
    listener did not start (Open MPI's transient, see ``launcher.listener_failed``) is run once more, as the
    proxy does."""
    from tpserve.proxy import launcher

    for attempt in range(2):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_session(proc)
            out, _ = proc.communicate(timeout=30)
            raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd)}\n{out[-6000:]}") from None
        if proc.returncode == 0 or attempt or not launcher.listener_failed(out):
            break
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def launch_logged(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """mpirun (or a wrapper of it) in a session of its own, its output appended to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def listener_failed(popen: subprocess.Popen, log_path: Path) -> bool:
    """mpirun exited because its PMIx listener did not start (Open MPI's transient, ``launcher.listener_failed``):
    the test engines launch it once more, as the proxy does."""
    from tpserve.proxy import launcher

    return popen.poll() is not None and launcher.listener_failed(Path(log_path).read_text(errors="replace"))


def run_mpi_pytest(n: int, target: str, timeout: float = 300) -> None:
    """Runs a tests/mpi module on ``n`` ranks under pytest-mpi; one rank's failure aborts them all."""
    cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(n), sys.executable, "-m", "mpi4py", "-m", "pytest",
           "--with-mpi", "-p", "no:cacheprovider", "-q", target]
    result = run_group(cmd, timeout, env=mpi_environment(n))
    assert result.returncode == 0, f"MPI suite failed on {n} ranks (exit {result.returncode}):\n{result.stdout[-6000:]}"


def kill_session(popen: subprocess.Popen, timeout: float = 10) -> None:
    """kill -9 of a process and every other process of its session (Open MPI 5 gives each rank a process
    group of its own, so the group of mpirun is not enough), then reaps it."""
    from tpserve.proxy.launcher import session_pids

    for pid in {popen.pid, *session_pids(popen.pid)}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    popen.wait(timeout)


def worker_processes() -> list[psutil.Process]:
    """Every live tpserve worker or mpirun on this machine that this test process started."""
    me = psutil.Process()
    found = []
    for p in me.children(recursive=True):
        try:
            if "tpserve.worker" in " ".join(p.cmdline()) or p.name() in ("mpirun", "prterun", "prted"):
                found.append(p)
        except psutil.Error:
            continue
    return found


def model_greedy(model, config, prompts: list[list[int]], max_new_tokens: int, chunk: int | None = None,
                 tp_size: int = 1):
    """Greedy decoding straight on the model room, all prompts in one batch: prompts in chunks of up to
    ``chunk`` tokens, then decodes, so sequences still prefilling share forwards with decoding ones.
    Returns the tokens and every step's logits (to check that ranks agree bit for bit)."""
    import torch

    from tpserve.model import AttentionMetadata, KVCache

    block_size = 4  # small blocks, handed out in a shuffled order: tables that jump around the pool
    per_seq = -(-(max(map(len, prompts)) + max_new_tokens) // block_size)
    order = list(range(1, 1 + per_seq * len(prompts)))
    random.Random(0).shuffle(order)
    tables = [order[i * per_seq : (i + 1) * per_seq] for i in range(len(prompts))]
    kv = KVCache(config, tp_size, 1 + per_seq * len(prompts), block_size, "cpu", torch.float32)
    cached = [0] * len(prompts)
    outputs: list[list[int]] = [[] for _ in prompts]
    all_logits = []
    active = list(range(len(prompts)))
    while active:
        pending = [(prompts[i] + outputs[i])[cached[i]:][:chunk] for i in active]
        meta, positions = AttentionMetadata.build([tables[i] for i in active], [cached[i] for i in active],
                                                  list(map(len, pending)), block_size, "cpu")
        logits = model(torch.tensor(sum(pending, [])), positions, meta, kv)
        assert logits.shape == (len(active), config.vocab_size) and logits.dtype == torch.float32
        all_logits.append(logits)
        for row, (i, new) in enumerate(zip(active, pending, strict=True)):
            cached[i] += len(new)
            if cached[i] == len(prompts[i]) + len(outputs[i]):
                outputs[i].append(int(logits[row].argmax()))
        active = [i for i in active
                  if len(outputs[i]) < max_new_tokens and not (outputs[i] and outputs[i][-1] in config.eos_token_ids)]
    return outputs, all_logits

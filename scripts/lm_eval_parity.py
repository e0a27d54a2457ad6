"""lm-eval against tpserve serve and against Hugging Face on the same checkpoint: the log-likelihood task of
tests/lm_eval_task (a local file, no download), run once with lm-eval's ``local-completions`` model against a
running ``tpserve serve`` and once with its ``hf`` model (float32, CPU); every document's log-likelihood must
agree within 1e-3, and so must lm-eval's greedy flag.

    python scripts/lm_eval_parity.py [--model DIR] [--tp 1] [--python PYTHON_WITH_LM_EVAL] [--out DIR]

lm-eval is not a test dependency (it pulls datasets, evaluate, scikit-learn, ...): ``--python`` names an
interpreter that has it (``pip install lm-eval``); the server runs on this interpreter (it needs mpirun
beside it); tpserve comes from this checkout through PYTHONPATH. The
default model is the tests' tiny random Llama with the default model's tokenizer. Prints a JSON summary
and exits 1 when a document differs by more than the tolerance. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASK_DIR = ROOT / "tests" / "lm_eval_task"
TASK = "tpserve_loglikelihood"
TOLERANCE = 1e-3


def tiny_model() -> Path:
    """The tests' model (tests/helpers.py built_model("llama")): built once into the cache."""
    from tpserve.model.default_model import cache_dir, default_model_path
    from tpserve.model.random_model import make_model

    path = cache_dir() / "test-models" / "llama-tiny-tok-v1"
    if not (path / "config.json").exists():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        make_model(tmp, "llama", size="tiny", seed=1234, tokenizer_dir=default_model_path())
        os.rename(tmp, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def lm_eval_command(python: str, model: str, model_args: str, out: Path) -> list[str]:
    """The command, as a user would type it (run from the task's folder: its data file is relative)."""
    return [python, "-m", "lm_eval", "run", "--model", model, "--model_args", model_args, "--tasks", TASK,
            "--include_path", str(TASK_DIR), "--output_path", str(out), "--log_samples", "--batch_size", "1", "--device", "cpu"]


def run_lm_eval(cmd: list[str], timeout: float) -> None:
    result = subprocess.run(cmd, cwd=TASK_DIR, env=environment(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"lm-eval failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")


def samples(out: Path) -> list[dict]:
    files = glob.glob(str(out / "**" / f"samples_{TASK}_*.jsonl"), recursive=True)
    if len(files) != 1:
        raise SystemExit(f"expected one samples file under {out}, found {files}")
    with open(files[0]) as f:
        rows = [json.loads(line) for line in f]
    return sorted(rows, key=lambda r: r["doc_id"])


def loglikelihoods(rows: list[dict]) -> list[tuple[float, bool]]:
    """Per document: lm-eval's (log-likelihood, is_greedy) of its one request."""
    return [(float(r["resps"][0][0][0]), bool(r["resps"][0][0][1])) for r in rows]


def start_server(python: str, model: Path, tp: int, port: int, log: Path) -> subprocess.Popen:
    cmd = [python, "-m", "tpserve.server.run", "--model", str(model), "--port", str(port), "--tp", str(tp),
           "--max-seq-len", "256", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=environment(), stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    import urllib.request

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit("the server did not become healthy in 180 s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the tests' tiny random Llama)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--python", default=sys.executable, help="an interpreter with lm-eval installed")
    p.add_argument("--out", default=None, help="where lm-eval writes its results (default: a temporary folder)")
    args = p.parse_args(argv)
    model = Path(args.model).resolve() if args.model else tiny_model()
    out = Path(args.out or tempfile.mkdtemp(prefix="lm_eval_parity_"))
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_server(sys.executable, model, args.tp, port, out / "server.log")
    timings = {}
    try:
        served = (f"model={model},base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend=huggingface,"
                  f"tokenizer={model},num_concurrent=1,max_retries=1,tokenized_requests=True")
        cmd_server = lm_eval_command(args.python, "local-completions", served, out / "tpserve")
        start = time.perf_counter()
        run_lm_eval(cmd_server, 900)
        timings["tpserve_s"] = round(time.perf_counter() - start, 1)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    cmd_hf = lm_eval_command(args.python, "hf", f"pretrained={model},dtype=float32", out / "hf")
    start = time.perf_counter()
    run_lm_eval(cmd_hf, 900)
    timings["hf_s"] = round(time.perf_counter() - start, 1)
    ours, theirs = loglikelihoods(samples(out / "tpserve")), loglikelihoods(samples(out / "hf"))
    if len(ours) != len(theirs) or not ours:
        raise SystemExit(f"document counts differ: {len(ours)} vs {len(theirs)}")
    diffs = [abs(a[0] - b[0]) for a, b in zip(ours, theirs, strict=True)]
    greedy_same = all(a[1] == b[1] for a, b in zip(ours, theirs, strict=True))
    summary = {
        "task": TASK, "documents": len(ours), "model": str(model), "tp": args.tp,
        "max_abs_diff": max(diffs), "tolerance": TOLERANCE, "greedy_flags_equal": greedy_same,
        "tpserve_loglikelihoods": [a[0] for a in ours], "hf_loglikelihoods": [b[0] for b in theirs],
        "commands": {"tpserve": " ".join(cmd_server), "hf": " ".join(cmd_hf)}, **timings,
    }
    print(json.dumps(summary, indent=1))
    return 0 if max(diffs) <= TOLERANCE and greedy_same else 1


if __name__ == "__main__":
    sys.exit(main())

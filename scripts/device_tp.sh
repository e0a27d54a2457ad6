#!/bin/bash
# Issue 11's GPU runs (tensor parallelism over NCCL with CUDA graphs) on a device machine with several GPUs
# (nvidia-h200-x4; on nvidia-h200-x2 set TPS="1 2"), from the project root, carrying .whl and .devmodel (see
# scripts/measure.sh). Stages, in the order given; each call must start with `models` (a fresh machine has none;
# models already built are kept):
#   models   /tmp/m/qwen3-small (parity: 8 heads, 4 KV heads, so TP 4 divides them), /tmp/m/qwen3 (Qwen3-0.6B
#            shape), /tmp/m/qwen3-8b (Qwen3-8B shape, random bf16, ~16 GB, built on GPU 0)
#   parity   scripts/gpu_parity.py on qwen3-small at each TP of TPS above 1 (NCCL, bf16, HF bf16 reference)
#   profile  scripts/gpu_tp_profile.py: decode ms/step at batch 1 and 32 and the collectives' time per step, 8B
#            shape at each TP of TPS, then the 0.6B shape at TP 1 and 2 (what the all-reduces cost there)
#   latency  tpserve bench latency, 8B shape at each TP: 128 in / 128 out, concurrency 1 and 32, overlap+early
#   serve    tpserve serve + bench serve, 8B shape at each TP: 512 in / 128 out, 500 prompts, rate 16 and inf
# Usage: TPS="1 2 4" bash scripts/device_tp.sh models parity     (then: models profile, models latency, ...)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TPSERVE_CACHE_DIR=/tmp/tpc
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=^ofi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TPS=${TPS:-1 2 4}
MPIRUN=$(python3 -c 'from tpserve.proxy.launcher import mpirun_path; print(mpirun_path())') || exit 1
for stage in "$@"; do
  echo "== $stage $(date +%T) TPS=$TPS"
  case $stage in
  models)
    nvidia-smi -L
    TOK=.devmodel/tok timeout 400 python3 - <<'PY' 2>&1 | grep -v "Loading\|Writing"
import os, shutil, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, Qwen3Config
from tpserve.model.random_model import _tokenizer_info, make_model
tok = Path(os.environ["TOK"])
if not Path('/tmp/m/qwen3-small/config.json').exists():
    make_model('/tmp/m/qwen3-small', 'qwen3', 'small')
if not Path('/tmp/m/qwen3/config.json').exists():
    make_model('/tmp/m/qwen3', 'qwen3', 'qwen3-0.6b', vocab_size=151936, tokenizer_dir=tok)
out = Path('/tmp/m/qwen3-8b')
if not (out / 'config.json').exists():  # Qwen3-8B's shape; HF's own init (std 0.02) keeps bf16 finite
    _, ids = _tokenizer_info(tok)
    cfg = Qwen3Config(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False,
                      max_position_embeddings=40960, rope_theta=1000000.0, dtype="bfloat16", **ids)
    torch.manual_seed(0)
    with torch.device("cuda:0"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    m.save_pretrained(out)
    [shutil.copy(f, out) for f in tok.iterdir() if f.name != 'config.json']
    del m
print({p.name: round(sum(f.stat().st_size for f in p.iterdir()) / 2**30, 2) for p in Path('/tmp/m').iterdir()}, 'GiB')
PY
    ;;
  parity)
    for tp in $TPS; do
      [ "$tp" = 1 ] && continue
      timeout 300 python3 scripts/gpu_parity.py /tmp/m/qwen3-small --tp "$tp" 2>&1 | grep -v Loading \
        | tee "$OUT/parity_tp$tp.txt" | tail -25
      cp /tmp/gpu_parity.json "$OUT/parity_tp$tp.json"
    done ;;
  profile)
    for tp in $TPS; do
      timeout 300 "$MPIRUN" -n "$tp" python3 -m mpi4py scripts/gpu_tp_profile.py /tmp/m/qwen3-8b --batch 1,32 \
        --json "$OUT/profile_8b_tp$tp.json" 2>&1 | grep -v "Loading\|USDT" | tail -30
    done
    for tp in 1 2; do
      timeout 200 "$MPIRUN" -n "$tp" python3 -m mpi4py scripts/gpu_tp_profile.py /tmp/m/qwen3 --batch 1,32 \
        --json "$OUT/profile_06b_tp$tp.json" 2>&1 | grep -v "Loading\|USDT" | tail -30
    done ;;
  latency)
    for tp in $TPS; do
      timeout 300 python3 -m tpserve.cli bench latency --model /tmp/m/qwen3-8b --tp "$tp" --modes overlap+early \
        --label "gpu-8b-tp$tp" --doc "$OUT/bench_8b_tp$tp.md" --json "$OUT/lat_8b_tp$tp.json" \
        --plot "$OUT/lat_8b_tp$tp.png" --concurrency 1,32 --rounds 1 --output-len 128 2>&1 | grep -v Loading | tail -12
    done ;;
  serve)
    for tp in $TPS; do
      python3 -m tpserve.cli serve --model /tmp/m/qwen3-8b --tp "$tp" --port 8123 --max-batch-size 256 \
        ${SERVE_ARGS:-} > "$OUT/serve_8b_tp$tp.log" 2>&1 &
      for i in $(seq 300); do python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8123/health')" 2>/dev/null && break; sleep 1; done
      for rate in 16 inf; do
        timeout 150 python3 -m tpserve.cli bench serve --base-url http://127.0.0.1:8123 --input-len 512 --output-len 128 \
          --num-prompts 500 --request-rate $rate --seed 0 --prompt-ids --disable-tqdm --result-dir "$OUT" \
          --result-filename "serve_8b_tp${tp}_rate$rate.json" --label "8b-tp$tp-rate$rate" --no-plots 2>&1 | tail -14
      done
      kill -TERM %1; wait
    done ;;
  *) echo "unknown stage $stage"; exit 2 ;;
  esac
done

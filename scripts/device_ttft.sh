#!/bin/bash
# GPU checks and figures of the TTFT issue (prompt steps in CUDA graphs, nothing compiles while serving) on
# the device, from the project root, carrying .whl and .devmodel (see scripts/measure.sh, whose workloads
# these are). Stages, in the order given; outputs under $OUT:
#   graphs   scripts/gpu_prompt_graphs.py, Qwen3-0.6B shape: graphed mixed steps vs eager, compiles after ready,
#            one step's wall time graphed vs eager
#   startup  scripts/gpu_startup.py, Qwen3-0.6B shape: cold start (empty Triton cache), warm start, HF greedy check
#   parity   scripts/gpu_parity.py on a small Qwen3 (engine bf16 vs HF bf16, TP 1)
#   latency  tpserve bench latency, plain vs overlap+early, concurrency 1 and 32, both shapes (128 in / 128 out)
#   serve    measure.sh B on a fresh server with an empty Triton cache, then its triton_compiles counter
#   prefix   scripts/bench_prefix.py, Qwen3-0.6B shape: TTFT with a shared 1,000-token prompt, hit vs miss
#   A        measure.sh A: HF eager generate beside tpserve bench latency (every loop mode, concurrency 1 and 32)
# Usage: bash scripts/device_ttft.sh graphs startup A
set -uo pipefail
nvidia-smi -L
. scripts/device_setup.sh || exit 1
for stage in "$@"; do
  echo "== $stage $(date +%T)"
  case $stage in
  graphs) TRITON_CACHE_DIR=/tmp/tc-graphs timeout 300 python3 scripts/gpu_prompt_graphs.py /tmp/m/qwen3 --out "$OUT" 2>&1 \
      | grep -v Loading | tail -8 ;;
  startup) TRITON_CACHE_DIR=/tmp/tc-startup timeout 200 python3 scripts/gpu_startup.py --out "$OUT" 2>&1 | grep -v Loading | tail -8 ;;
  parity) timeout 200 python3 scripts/gpu_parity.py /tmp/m/qwen3-small --tp 1 2>&1 | tee "$OUT/parity.txt" | tail -8 ;;
  latency)
    for m in qwen3 smol; do
      timeout 200 python3 -m tpserve.cli bench latency --model /tmp/m/$m --label gpu-$m --doc "$OUT/bench_$m.md" \
        --json "$OUT/lat_$m.json" --modes plain,overlap+early --concurrency 1,32 --rounds 1 --output-len 128 2>&1 \
        | grep -v Loading | tail -9
    done ;;
  serve)
    TRITON_CACHE_DIR=/tmp/tc-serve python3 -m tpserve.cli serve --model /tmp/m/qwen3 --port 8123 --max-batch-size 256 \
      ${SERVE_ARGS:-} > "$OUT/serve.log" 2>&1 &
    for i in $(seq 150); do python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8123/health')" 2>/dev/null && break; sleep 1; done
    echo "ready after ${i} s"
    for rate in 16 inf; do
      timeout 100 python3 -m tpserve.cli bench serve --base-url http://127.0.0.1:8123 --input-len 512 --output-len 128 \
        --num-prompts 500 --request-rate $rate --seed 0 --prompt-ids --disable-tqdm --result-dir "$OUT" \
        --result-filename serve_rate$rate.json --label qwen3-rate$rate --no-plots 2>&1 | tail -14
      python3 -c "import urllib.request as u; print([l for l in u.urlopen('http://127.0.0.1:8123/metrics').read().decode().splitlines() if 'triton_compiles_total' in l])"
    done
    kill -TERM %1; wait ;;
  prefix) timeout 100 python3 scripts/bench_prefix.py --model /tmp/m/qwen3 ${PREFIX_ARGS:-} 2>&1 | tee "$OUT/prefix.txt" | tail -3 ;;
  A) OUT=$OUT timeout 420 bash scripts/measure.sh A 2>&1 | grep -v "Loading\|Writing" | grep '"model"\|ttft\|TTFT\||' | tail -40 ;;
  esac
done

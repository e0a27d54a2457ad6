#!/bin/bash
# GPU checks and figures of the paged-KV and fast-path issues on the device (one H200), from the project root,
# carrying .whl and .devmodel (see scripts/measure.sh, whose workloads these are). Stages, in the order given:
#   smoke    scripts/gpu_graphs_check.py on a small Qwen3: graphs vs eager tokens, no host sync, decode ms/step
#   parity   scripts/gpu_parity.py (engine in bf16 vs HF bf16, TP 1)
#   serve    scripts/measure.sh B: tpserve serve + bench serve, Qwen3-0.6B shape, 512 in / 128 out, 500 prompts
#   latency  tpserve bench latency on the SmolLM2 and Qwen3-0.6B shapes (measure.sh A without the HF half)
#   hf       measure.sh A's HF eager half
#   prefix   scripts/bench_prefix.py, Qwen3-0.6B shape: TTFT with a shared 1,000-token prompt, hit vs miss
# Usage: bash scripts/device_fastpath.sh smoke serve latency
set -uo pipefail
. scripts/device_setup.sh || exit 1
for stage in "$@"; do
  echo "== $stage $(date +%T)"
  case $stage in
  smoke) timeout 120 python3 scripts/gpu_graphs_check.py /tmp/m/qwen3-small 2>&1 | grep -v Loading | tee "$OUT/graphs.txt" | tail -40 ;;
  parity) timeout 200 python3 scripts/gpu_parity.py /tmp/m/qwen3-small --tp 1 2>&1 | tee "$OUT/parity.txt" | tail -25 ;;
  serve)
    python3 -m tpserve.cli serve --model /tmp/m/qwen3 --port 8123 --max-batch-size 256 ${SERVE_ARGS:-} > "$OUT/serve.log" 2>&1 &
    for i in $(seq 120); do python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8123/health')" 2>/dev/null && break; sleep 1; done
    for rate in 16 inf; do
      timeout 100 python3 -m tpserve.cli bench serve --base-url http://127.0.0.1:8123 --input-len 512 --output-len 128 \
        --num-prompts 500 --request-rate $rate --seed 0 --prompt-ids --disable-tqdm --result-dir "$OUT" \
        --result-filename serve_rate$rate.json --label qwen3-rate$rate --no-plots 2>&1 | tail -14
    done
    kill -TERM %1; wait ;;
  latency)
    timeout 150 python3 -m tpserve.cli bench latency --model /tmp/m/qwen3 --label gpu-qwen3 --doc "$OUT/bench_qwen3.md" \
      --json "$OUT/lat_qwen3.json" --concurrency 1,32 --rounds 1 --output-len 128 2>&1 | grep -v Loading | tail -12
    timeout 100 python3 -m tpserve.cli bench latency --model /tmp/m/smol --label gpu-smol --doc "$OUT/bench_smol.md" \
      --json "$OUT/lat_smol.json" --concurrency 1 --rounds 1 --output-len 128 2>&1 | grep -v Loading | tail -12 ;;
  hf) OUT=$OUT timeout 200 bash scripts/measure.sh A 2>&1 | grep '"model"' ;;
  prefix) timeout 100 python3 scripts/bench_prefix.py --model /tmp/m/qwen3 ${PREFIX_ARGS:-} 2>&1 | tee "$OUT/prefix.txt" | tail -3 ;;
  esac
done

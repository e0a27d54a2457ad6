#!/bin/bash
# GPU figures of the host-path issue (the host keeps up with the GPU) on the device, from the project root,
# carrying .whl and .devmodel (see scripts/measure.sh, whose workloads these are). Stages, in the order given;
# outputs under $OUT:
#   sampler  scripts/gpu_sampler.py: the sampling kernel against its torch reference on [32, 151,936] logits and
#            its time beside greedy argmax; if it fails, the later stages sample with the torch reference
#            (TPSERVE_TORCH_SAMPLER=1), so the run still measures the rest
#   profile  scripts/host_profile.py: host time per steady decode iteration by part, batch 1, 32, 256 (Qwen3-0.6B
#            shape) and 1 (SmolLM2 shape)
#   latency  tpserve bench latency, overlap+early, concurrency 1 and 32, 128 in / 128 out, both shapes
#            (LATENCY_MODELS picks)
#   sampling tpserve bench latency, Qwen3 at concurrency 32 sampled (temperature 0.8, top-p 0.9, a seed per
#            request) beside greedy
#   serve    tpserve serve with default options + tpserve bench serve, Qwen3-0.6B shape, random 512 in / 128 out,
#            500 prompts, all at once and at 16 req/s (measure.sh B's workload without its --max-batch-size)
#   hops     scripts/hop_profile.py, Qwen3-0.6B shape: each hand-off of a first token at concurrency 1 (p50/p90)
#   parity   scripts/gpu_parity.py on a small Qwen3 (engine bf16 vs HF bf16 greedy, TP 1)
#   prefix   scripts/bench_prefix.py, Qwen3-0.6B shape: TTFT with a shared 1,000-token prompt, hit vs miss
#   structured  scripts/bench_structured.py, Qwen3-0.6B shape: ITL with a JSON schema on every request vs
#            unconstrained at batch 1 and 32, TTFT of a new and a cached schema
#   A        measure.sh A: HF eager generate beside tpserve bench latency (every loop mode, concurrency 1 and 32)
# Usage: OUT=/tmp/res bash scripts/device_host.sh profile latency serve
set -uo pipefail
nvidia-smi -L
. scripts/device_setup.sh || exit 1
for stage in "$@"; do
  echo "== $stage $(date +%T)"
  case $stage in
  sampler)
    timeout ${SAMPLER_TIMEOUT-200} python3 scripts/gpu_sampler.py --out "$OUT/sampler.md" 2>&1 | grep -v Loading | tail -30
    rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { echo "gpu_sampler.py failed ($rc): TPSERVE_TORCH_SAMPLER=1 from here"; export TPSERVE_TORCH_SAMPLER=1; } ;;
  profile)
    timeout 240 python3 scripts/host_profile.py --model /tmp/m/qwen3 --batch 1,32,256 --iterations 200 2>&1 \
      | grep -v Loading | tee "$OUT/profile_qwen3.txt" | tail -6
    [ -n "${PROFILE_SMOL-1}" ] && timeout 120 python3 scripts/host_profile.py --model /tmp/m/smol --batch 1 \
      --iterations 200 2>&1 | grep -v Loading | tee "$OUT/profile_smol.txt" | tail -3 ;;
  latency)
    for m in ${LATENCY_MODELS-qwen3 smol}; do
      timeout 200 python3 -m tpserve.cli bench latency --model /tmp/m/$m --label gpu-$m --json "$OUT/lat_$m.json" \
        --modes overlap+early --concurrency 1,32 --rounds 1 --output-len 128 2>&1 | grep -v Loading | tail -4
    done ;;
  sampling)
    for t in 0 0.8; do
      timeout 200 python3 -m tpserve.cli bench latency --model /tmp/m/qwen3 --label gpu-qwen3-t$t \
        --json "$OUT/lat_qwen3_t$t.json" --modes overlap+early --concurrency 32 --rounds 1 --output-len 128 \
        --temperature $t --top-p 0.9 2>&1 | grep -v Loading | tail -3
    done ;;
  serve)
    TRITON_CACHE_DIR=/tmp/tc-serve python3 -m tpserve.cli serve --model /tmp/m/qwen3 --port 8123 > "$OUT/serve.log" 2>&1 &
    for i in $(seq 150); do python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8123/health')" 2>/dev/null && break; sleep 1; done
    echo "ready after ${i} s"
    for rate in ${SERVE_RATES-inf 16}; do
      timeout 100 python3 -m tpserve.cli bench serve --base-url http://127.0.0.1:8123 --input-len 512 --output-len 128 \
        --num-prompts 500 --request-rate $rate --seed 0 --prompt-ids --disable-tqdm --result-dir "$OUT" \
        --result-filename serve_rate$rate.json --label qwen3-default-rate$rate --no-plots 2>&1 | tail -14
    done
    python3 -c "import urllib.request as u; print([l for l in u.urlopen('http://127.0.0.1:8123/metrics').read().decode().splitlines() if 'triton_compiles_total' in l or 'max_batch' in l])"
    kill -TERM %1; wait
    grep -i "warn\|max_batch\|ready in" "$OUT/serve.log" | head -5 ;;
  hops) timeout 120 python3 scripts/hop_profile.py --model /tmp/m/qwen3 --requests 200 2>&1 | grep -v Loading \
      | tee "$OUT/hops.txt" | tail -16 ;;
  parity) timeout 200 python3 scripts/gpu_parity.py /tmp/m/qwen3-small --tp 1 2>&1 | tee "$OUT/parity.txt" | tail -8 ;;
  prefix) timeout 100 python3 scripts/bench_prefix.py --model /tmp/m/qwen3 2>&1 | tee "$OUT/prefix.txt" | tail -3 ;;
  structured) timeout 200 python3 scripts/bench_structured.py --model /tmp/m/qwen3 --tokens 128 --rounds ${STRUCT_ROUNDS-3} 2>&1 \
      | grep -v Loading | tee "$OUT/structured.txt" | tail -8 ;;
  A) OUT=$OUT timeout 420 bash scripts/measure.sh A 2>&1 | grep -v "Loading\|Writing" | grep '"model"\|ttft\|TTFT\||' | tail -40 ;;
  esac
done

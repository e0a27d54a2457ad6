#!/usr/bin/env bash
# tpserve bench serve against the plain loop and the overlap loop + early emission, at two request rates.
#   scripts/bench_serve_modes.sh MODEL_OR_default OUTDIR INPUT_LEN OUTPUT_LEN NUM_PROMPTS RATE1 RATE2
set -uo pipefail
model=$1 out=$2 in_len=$3 out_len=$4 n=$5; shift 5
margs=(); [ "$model" = default ] || margs=(--model "$model")
mkdir -p "$out"
for mode in plain overlap+early; do
  extra=(); [ $mode = plain ] && extra=(--no-overlap)
  python -m tpserve.cli serve "${margs[@]}" --port 8124 --max-batch-size 64 --max-seq-len $((in_len + out_len + 16)) \
    "${extra[@]}" > "$out/server_$mode.log" 2>&1 &
  server=$!
  for _ in $(seq 180); do
    python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8124/health')" 2>/dev/null && break; sleep 1
  done
  for rate in "$@"; do
    python -m tpserve.cli bench serve --base-url http://127.0.0.1:8124 --input-len "$in_len" --output-len "$out_len" \
      --num-prompts "$n" --request-rate "$rate" --seed 0 --disable-tqdm --result-dir "$out" \
      --result-filename "$mode-rate$rate.json" --label "$mode-rate$rate" --no-plots | tail -30
  done
  kill -TERM $server; wait $server
done

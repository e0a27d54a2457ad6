#!/usr/bin/env bash
# The GPU runs of docs/benchmarks.md, for the device machine (2 GPUs): wheels from .whl (pyzmq, gguf,
# fastapi stack), the default model's GGUF in two carried parts (.devmodel/a, .devmodel/b). Stage 1:
# parity over NCCL + the Qwen3-0.6B-shaped latency bench; stage 2: the default model.
set -uo pipefail
stage=$1
S=/tmp/site
[ -d $S ] || python3 -m pip install -q --no-index --no-deps --target $S .whl/*.whl
export PYTHONPATH=$S:$PWD PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TPSERVE_CACHE_DIR=/tmp/tpserve-cache
OUT=${OUT:-/tmp/out}
nvidia-smi -L
python3 -c 'import torch; print("torch", torch.__version__, "gpus", torch.cuda.device_count())'
serve_bench() {  # $1 model dir, $2 label: plain loop vs overlap + early, two request rates each
  for mode in plain early; do
    extra=""; [ $mode = plain ] && extra="--no-overlap"
    python3 -m tpserve.cli serve --model "$1" --port 8123 --max-batch-size 64 --max-seq-len 1200 $extra \
      > $OUT/serve_$mode.log 2>&1 &
    for i in $(seq 120); do python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8123/health')" \
      2>/dev/null && break; sleep 1; done
    for rate in 8 32; do
      python3 -m tpserve.cli bench serve --base-url http://127.0.0.1:8123 --input-len 512 --output-len 64 \
        --num-prompts 120 --request-rate $rate --seed 0 --prompt-ids --disable-tqdm --result-dir $OUT/serve \
        --label "$2-$mode-rate$rate" --no-plots 2>&1 | tail -22
    done
    kill -TERM %1; wait
  done
}
if [ "$stage" = serve ]; then  # on the warm stage-3 machine
  python3 -m pip install -q --no-index --no-deps --target $S .whl/opentelemetry*.whl .whl/importlib_metadata*.whl
  serve_bench /tmp/m/Qwen3-0.6B-shaped-random qwen3
  exit 0
fi
if [ "$stage" = 3 ]; then
  python3 -c "
from tpserve.model.random_model import make_model
make_model('/tmp/m/Qwen3-0.6B-shaped-random', 'qwen3', 'qwen3-0.6b', vocab_size=151936, tokenizer_dir='.devmodel/tok')"
  python3 -m tpserve.cli bench latency --model /tmp/m/Qwen3-0.6B-shaped-random --label gpu-qwen3 --doc $OUT/bench.md \
    --plot $OUT/bench_latency_gpu_qwen3.png --json $OUT/bench_qwen3.json --rounds 2 2>&1 | tail -16
  serve_bench /tmp/m/Qwen3-0.6B-shaped-random qwen3
  exit 0
fi
if [ "$stage" = 1 ]; then
  cp .devmodel/a/part1 /tmp/gguf.part1
  python3 -m tpserve.cli make-model /tmp/m/llama-small --arch llama --size small --no-tokenizer
  python3 scripts/gpu_parity.py /tmp/m/llama-small --tp 2 2>&1 | tee $OUT/parity.txt
  python3 -m tpserve.cli bench latency --model qwen3-0.6b-random --label gpu-qwen3 --doc $OUT/bench.md \
    --plot $OUT/bench_latency_gpu_qwen3.png --json $OUT/bench_qwen3.json --rounds 2 2>&1 | tail -20
else
  cat /tmp/gguf.part1 .devmodel/b/part2 > /tmp/smol.gguf
  python3 -c "
from pathlib import Path
from tpserve.model.default_model import cache_dir, convert_gguf
convert_gguf(Path('/tmp/smol.gguf'), cache_dir() / 'models' / 'SmolLM2-135M-Instruct')"
  python3 -m tpserve.cli generate "What is the capital of France?" --chat --max-tokens 64 2>&1 | tee $OUT/generate.txt
  python3 -m tpserve.cli bench latency --model default --label gpu-default --doc $OUT/bench.md \
    --plot $OUT/bench_latency_gpu_default.png --json $OUT/bench_default.json --rounds 2 2>&1 | tail -20
fi

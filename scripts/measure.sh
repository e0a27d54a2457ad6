#!/bin/bash
# The GPU measurement the performance goals are judged by (one H200, bf16, random weights of the real
# shapes): Hugging Face eager `generate` beside `tpserve bench latency` (stage A), and `tpserve serve` +
# `tpserve bench serve` on vLLM's published workload (stage B: Qwen3-0.6B shape, random 512 in / 128 out,
# 500 prompts, rate 16 and all at once). Run it on the device from the project root, carrying .whl (the
# wheels that ../shared/device/wheels.sh prepares: pyzmq fastapi starlette pydantic pydantic-core uvicorn
# annotated-types typing-inspection opentelemetry-api importlib-metadata typing-extensions zipp) and a
# folder with the default model's tokenizer files (TOK, default .devmodel/tok: tokenizer.json,
# tokenizer_config.json, config.json, chat_template.jinja of SmolLM2-135M-Instruct).
# Usage: bash scripts/measure.sh A|B  (a copy of ../shared/device/measure.sh, whose workloads are unchanged;
# SERVE_ARGS adds engine options to stage B's server, e.g. SERVE_ARGS=--enforce-eager for the eager run)
set -uo pipefail
stage=$1; TOK=${TOK:-.devmodel/tok}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TPSERVE_CACHE_DIR=/tmp/tpc
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
TOK=$TOK python3 - <<'PY'
import os, shutil, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
from tpserve.model.random_model import make_model
tok = Path(os.environ["TOK"])
torch.manual_seed(0)
m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tok)).to(torch.bfloat16)
m.save_pretrained('/tmp/m/smol'); [shutil.copy(f, '/tmp/m/smol') for f in tok.iterdir() if f.name != 'config.json']
make_model('/tmp/m/qwen3', 'qwen3', 'qwen3-0.6b', vocab_size=151936, tokenizer_dir=tok)
PY
if [ "$stage" = A ]; then
  python3 - <<'PY' | tee "$OUT/hf.jsonl"
import json, time, torch
from transformers import AutoModelForCausalLM
for name in ("smol", "qwen3"):
    m = AutoModelForCausalLM.from_pretrained(f"/tmp/m/{name}", dtype=torch.bfloat16).to("cuda").eval()
    for bs in (1, 32):
        ids = torch.randint(100, 40000, (bs, 128), device="cuda")
        kw = dict(max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0)
        m.generate(ids, **kw); torch.cuda.synchronize()
        t0 = time.perf_counter(); m.generate(ids, **kw); torch.cuda.synchronize(); t = time.perf_counter() - t0
        print(json.dumps({"model": name, "batch": bs, "ms_per_step": round(t / 128 * 1e3, 2), "tok_s": round(bs * 128 / t)}))
    del m; torch.cuda.empty_cache()
PY
  for m in smol qwen3; do
    python3 -m tpserve.cli bench latency --model /tmp/m/$m --label gpu-$m --doc "$OUT/bench_$m.md" \
      --plot "$OUT/lat_$m.png" --json "$OUT/lat_$m.json" --concurrency 1,32 --rounds 1 --output-len 128
  done
fi
if [ "$stage" = B ]; then
  python3 -m tpserve.cli serve --model /tmp/m/qwen3 --port 8123 --max-batch-size 256 ${SERVE_ARGS:-} > "$OUT/serve.log" 2>&1 &
  for i in $(seq 180); do python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8123/health')" 2>/dev/null && break; sleep 1; done
  for rate in 16 inf; do
    timeout 240 python3 -m tpserve.cli bench serve --base-url http://127.0.0.1:8123 --input-len 512 --output-len 128 \
      --num-prompts 500 --request-rate $rate --seed 0 --prompt-ids --disable-tqdm --result-dir "$OUT" \
      --result-filename serve_rate$rate.json --label qwen3-rate$rate --no-plots
  done
  kill -TERM %1; wait
fi

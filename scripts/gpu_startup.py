"""Start-up on the GPU, Qwen3-0.6B shape, bf16, default options: cold (a fresh machine, empty Triton
cache) and warm (the kernels compiled by the first start are in the cache), with where the time went; and a
greedy check of the engine (fused kernels + CUDA graphs) against HF bf16 between the two starts.

    python scripts/gpu_startup.py --out DIR          # one JSON line per result in DIR/startup.jsonl

Every result is written as soon as it exists, so a run cut short still reports what it measured.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PROMPTS = [[(i * 97 + j * 31) % 1000 + 5 for j in range(n)] for i, n in enumerate([5, 33, 120])]
NEW_TOKENS = 24


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/out")
    p.add_argument("--model-dir", default="/tmp/m/qwen3")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def record(**fields: object) -> None:
        line = json.dumps(fields)
        print(line, flush=True)
        with open(out / "startup.jsonl", "a") as f:
            f.write(line + "\n")

    from tpserve import LLM, SamplingParams
    from tpserve.model.random_model import make_model

    t = time.perf_counter()
    if not (Path(args.model_dir) / "config.json").exists():
        make_model(args.model_dir, "qwen3", "qwen3-0.6b", vocab_size=151936)
    record(stage="build_model", s=round(time.perf_counter() - t, 2))

    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    ours = None
    for which in ("cold", "warm"):
        llm = LLM(args.model_dir, dtype="bfloat16")
        info = llm.info
        record(stage=which, startup_s=llm.startup_s, rank0_startup_s=info["startup_s"],
               stages=info["startup_stages_s"], graph_buckets=len(info["cuda_graphs"]),
               prompt_graphs=len(info["prompt_graphs"]), compiles_at_start=info["triton_compiles_at_start"],
               graph_capture_s=info["graph_capture_s"], device=info["device"])
        t = time.perf_counter()
        outs = llm.generate(PROMPTS, greedy)
        record(stage=f"{which}_first_generate", s=round(time.perf_counter() - t, 3),
               triton_compiles_after_ready=llm.stats().get("triton_compiles"))
        ours = ours or [o.token_ids for o in outs]
        llm.shutdown()
        if which == "cold":
            record(stage="hf_check", **hf_check(args.model_dir, ours))


def hf_check(model_dir: str, ours: list[list[int]]) -> dict[str, object]:
    """The agreeing prefix of our greedy tokens and HF bf16's (bf16 near-ties may flip a later token)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    prefixes = []
    for prompt, mine in zip(PROMPTS, ours, strict=True):
        ref = hf.generate(torch.tensor([prompt]).cuda(), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        n = 0
        while n < min(len(mine), len(ref)) and mine[n] == ref[n]:
            n += 1
        prefixes.append(n)
    return {"agreeing_prefix": prefixes, "tokens": NEW_TOKENS, "first_tokens_equal": min(prefixes) >= 1}


if __name__ == "__main__":
    main()

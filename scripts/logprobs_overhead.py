"""What log-probabilities cost a greedy decode: inter-token latency (ITL) with ``logprobs=5`` on every request
against the same requests without, at batch 1 and 32, on one engine, the two runs interleaved round after
round so a noisy machine affects both alike. Greedy tokens must be identical with and without.

    python scripts/logprobs_overhead.py [--model DIR] [--batches 1,32] [--output-len 64] [--rounds 3]

Prints a JSON summary (ITL p50 and mean per batch and mode, and the ratios). Target: <= 1.15x.
Figures: docs/benchmarks.md ("Log-probabilities").
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

from tpserve import LLM, SamplingParams
from tpserve.latency_stats import chunk_gaps


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[list[float], list[list[int]]]:
    """All prompts at once (the batch), streamed; every token gap of every request after its first token."""
    streams = [llm.generate_stream(p, params) for p in prompts]
    outs = [s.result(timeout=600) for s in streams]
    gaps = [g for o in outs for g in chunk_gaps(o.metrics.chunk_times)]
    return gaps, [o.token_ids for o in outs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the default model)")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--logprobs", type=int, default=5)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    plain = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    asking = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True, logprobs=args.logprobs)
    results: dict = {}
    with LLM(model=args.model, max_batch_size=max(batches), max_seq_len=args.input_len + args.output_len + 8,
             enable_prefix_caching=False) as llm:
        vocab = int(llm.info["vocab_size"])
        rng = random.Random(0)
        for batch in batches:
            prompts = [[rng.randrange(10, vocab) for _ in range(args.input_len)] for _ in range(batch)]
            run(llm, prompts, plain)  # warm-up
            gaps: dict[str, list[float]] = {"off": [], "on": []}
            for _ in range(args.rounds):
                off, tokens_off = run(llm, prompts, plain)
                on, tokens_on = run(llm, prompts, asking)
                if tokens_off != tokens_on:
                    raise SystemExit("greedy tokens changed when log-probabilities were asked for")
                gaps["off"] += off
                gaps["on"] += on
            row = {mode: {"itl_p50_ms": round(1e3 * statistics.median(g), 3),
                          "itl_mean_ms": round(1e3 * statistics.fmean(g), 3), "gaps": len(g)}
                   for mode, g in gaps.items()}
            row["ratio_p50"] = round(row["on"]["itl_p50_ms"] / row["off"]["itl_p50_ms"], 3)
            row["ratio_mean"] = round(row["on"]["itl_mean_ms"] / row["off"]["itl_mean_ms"], 3)
            results[f"batch {batch}"] = row
        info = {k: llm.info[k] for k in ("model_dir", "device", "dtype", "vocab_size")}
    print(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S"), **info, "logprobs": args.logprobs,
                      "input_len": args.input_len, "output_len": args.output_len, "rounds": args.rounds,
                      "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

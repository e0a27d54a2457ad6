"""TTFT with and without a shared system prompt: the prefix cache's hit against its miss, side by side.

    python scripts/bench_prefix.py [--model DIR] [--prefix-len 1000] [--suffix-len 32] [--rounds 10] [engine options]

Each round sends one request whose prompt is a fresh random 1,000-token "system prompt" plus a unique
suffix (a miss), then one whose prompt is the shared system prompt plus a unique suffix (a hit: the
shared prompt was computed once before the rounds), one at a time, max_tokens=1. Prints medians and the
ratio, and one JSON line."""

from __future__ import annotations

import argparse
import json
import random
import statistics

from tpserve import LLM, SamplingParams
from tpserve.engine_args import EngineArgs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prefix-len", type=int, default=1000)
    p.add_argument("--suffix-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=10)
    EngineArgs.add_cli_args(p)
    args = p.parse_args()
    engine = EngineArgs.from_cli_args(args)
    rng = random.Random(0)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(100, 20000) for _ in range(n)]

    params = SamplingParams(max_tokens=1, temperature=0)
    shared = tokens(args.prefix_len)
    with LLM(**{k: getattr(engine, k) for k in EngineArgs.names()}) as llm:
        llm.generate([shared + tokens(args.suffix_len)], params, use_tqdm=False)  # warm-up; caches `shared`
        ttft: dict[str, list[float]] = {"miss": [], "hit": []}
        cached: dict[str, list[int]] = {"miss": [], "hit": []}
        for _ in range(args.rounds):
            for kind, prefix in (("miss", tokens(args.prefix_len)), ("hit", shared)):
                out = llm.generate([prefix + tokens(args.suffix_len)], params, use_tqdm=False)[0]
                ttft[kind].append(out.metrics.ttft * 1e3)
                cached[kind].append(out.num_cached_tokens)
        info = llm.info
    med = {k: statistics.median(v) for k, v in ttft.items()}
    print(f"model {info['model_dir']} on {info['device']} ({info['dtype']}), prompt {args.prefix_len} + {args.suffix_len}")
    print(f"TTFT p50 miss {med['miss']:.2f} ms, hit {med['hit']:.2f} ms, hit/miss {med['hit'] / med['miss']:.3f}; "
          f"cached tokens p50: miss {statistics.median(cached['miss'])}, hit {statistics.median(cached['hit'])}")
    print(json.dumps({"device": info["device"], "prefix_len": args.prefix_len, "suffix_len": args.suffix_len,
                      "rounds": args.rounds, "ttft_ms_p50": med, "ttft_ms": ttft, "cached_tokens": cached}))


if __name__ == "__main__":
    main()

"""Structured output's cost (issue 18): decode inter-token latency with a JSON-schema constraint on every
request against the same requests unconstrained, at batch 1 and 32; and the TTFT that a new schema (cold
grammar cache) and a cached one add at concurrency 1, against an unconstrained request.

    python scripts/bench_structured.py [--model DIR] [--tp 1] [--batches 1,32] [--tokens 64] [--rounds 3]

Every constrained request runs to ``--tokens`` (its schema, an array of at least 64 bounded strings, cannot
end sooner), so both sides decode the same batch for the same number of steps. ITL: the median gap between
a request's streamed tokens (stream_interval 1), over every request of a round; the figure is the median
of the rounds. Runs on CPU or GPU (the engine picks; ``--device`` passes through)."""

from __future__ import annotations

import argparse
import dataclasses
import statistics

from tpserve import LLM, SamplingParams, StructuredOutputs

LONG_SCHEMA = {"type": "array", "minItems": 64, "items": {"type": "string", "maxLength": 24}}


def ttft_schema(i: int) -> dict:
    """A typical schema (nested object, enum, bounded array, ranges), new for each ``i``: a cold compile."""
    return {"type": "object", "title": f"record{i}", "additionalProperties": False,
            "required": ["id", "name", "status", "tags", "owner"],
            "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 10**6},
                           "name": {"type": "string", "maxLength": 32},
                           "status": {"enum": ["open", "closed", "pending"]},
                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
                           "owner": {"type": "object", "additionalProperties": False, "required": ["email"],
                                     "properties": {"email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
                                                    "age": {"type": "integer", "minimum": 18, "maximum": 99}}}}}


def prompt(i: int) -> str:
    return f"Request {i}: write a JSON array of short names of cities, as long as you can."


def itl_round(llm: LLM, batch: int, params: SamplingParams, seed: int) -> float:
    """Median gap between streamed tokens (the dispatch thread's receipt times) over ``batch`` concurrent
    requests, from the second token on (decode steps only), in seconds."""
    streams = [llm.generate_stream(prompt(seed * 1000 + i), params) for i in range(batch)]
    gaps: list[float] = []
    for s in streams:
        t = s.result(timeout=600).metrics.chunk_times
        gaps += [b - a for a, b in zip(t[1:], t[2:], strict=False)]
    return statistics.median(gaps)


def ttft(llm: LLM, params: SamplingParams, i: int) -> float:
    """Submit to the first token's receipt, as the proxy measures it."""
    out = llm.generate_stream(prompt(i), params).result(timeout=300)
    return out.metrics.ttft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the default model, SmolLM2-135M)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ttft-requests", type=int, default=10)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    with LLM(args.model, tensor_parallel_size=args.tp, device=args.device, max_batch_size=max(batches),
             max_seq_len=512) as llm:
        print(f"device {llm.info['device']} model {llm.info['model_dir']} tp {args.tp}", flush=True)
        constrained = SamplingParams(max_tokens=args.tokens, temperature=0,
                                     structured=StructuredOutputs(json_schema=LONG_SCHEMA))
        free = dataclasses.replace(constrained, structured=None, ignore_eos=True)
        itl_round(llm, max(batches), constrained, 99)  # warm-up: the schema compiled, the kernels warm
        for batch in batches:
            res: dict[str, list[float]] = {"free": [], "json": []}
            for r in range(args.rounds):  # alternate, so drift in the machine's load hits both alike
                res["free"].append(itl_round(llm, batch, free, r))
                res["json"].append(itl_round(llm, batch, constrained, r))
            f, j = statistics.median(res["free"]), statistics.median(res["json"])
            print(f"batch {batch:3d}: decode ITL p50 unconstrained {f * 1e3:.2f} ms, json-schema {j * 1e3:.2f} ms, "
                  f"ratio {j / f:.3f}", flush=True)
        n = args.ttft_requests
        plain = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        cached = SamplingParams(max_tokens=2, temperature=0, structured={"json_schema": ttft_schema(-1)})
        ttft(llm, cached, 0)  # compiled once: cached from here on
        base, warm, cold = [], [], []
        for i in range(n):
            base.append(ttft(llm, plain, 100 + i))
            warm.append(ttft(llm, cached, 200 + i))
            cold.append(ttft(llm, SamplingParams(max_tokens=2, temperature=0,
                                                 structured={"json_schema": ttft_schema(i)}), 300 + i))
        b = statistics.median(base)
        print(f"TTFT p50 at concurrency 1 ({n} each): unconstrained {b * 1e3:.2f} ms; cached schema "
              f"{statistics.median(warm) * 1e3:.2f} ms (+{(statistics.median(warm) - b) * 1e3:.2f}); new schema "
              f"{statistics.median(cold) * 1e3:.2f} ms (+{(statistics.median(cold) - b) * 1e3:.2f})", flush=True)


if __name__ == "__main__":
    main()

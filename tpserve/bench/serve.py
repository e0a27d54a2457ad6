"""``tpserve bench serve``: load an OpenAI-compatible server with random prompts and report what
``vllm bench serve`` reports (TTFT, TPOT, ITL, E2E latency; request and token throughput), so that
tpserve's figures can be put beside vLLM's. Works against any server that streams /v1/completions.

Each request is timed from its send. TTFT ends at the first chunk that carries tokens; ITL is reported per
chunk (vLLM's definition) and per token (a chunk's gap shared by its tokens, which differs once a server
sends several tokens a chunk); TPOT = (E2E - TTFT) / (output tokens - 1). Token counts come from the
server's usage (``stream_options.continuous_usage_stats``), so the client needs no tokenizer to count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from tqdm import tqdm

from tpserve.latency_stats import chunk_gaps, percentile, token_gaps
from tpserve.proxy.tokenizer import Tokenizer

PERCENTILES = (50, 90, 99)


@dataclass
class Prompt:
    prompt: str | list[int]
    input_len: int
    output_len: int


@dataclass
class Result:
    """One request as the client saw it (seconds; chunk times relative to the request's send)."""

    input_len: int
    start: float = 0.0  # since the benchmark began
    ttft: float = 0.0
    e2e: float = 0.0
    output_len: int = 0
    chunk_times: list[float] = field(default_factory=list)  # chunks that carried tokens
    chunk_tokens: list[int] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    def itls(self) -> list[float]:
        """Gaps between consecutive token-carrying chunks (vLLM's ITL)."""
        return chunk_gaps(self.chunk_times)

    def token_itls(self) -> list[float]:
        """Each chunk's gap divided evenly among the tokens it carried."""
        return token_gaps(self.chunk_times, self.chunk_tokens)

    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_len - 1) if self.output_len > 1 else None


# -- dataset -------------------------------------------------------------------------------------------


def random_prompts(tok: Tokenizer, n: int, input_len: int, output_len: int, range_ratio: float, seed: int,
                   as_ids: bool) -> list[Prompt]:
    """vLLM's random dataset: uniform random token ids. As text, the ids are decoded and the text adjusted
    until it re-encodes to exactly the drawn length (decode/encode does not round-trip on its own)."""
    rng = np.random.default_rng(seed)
    vocab = len(tok)

    def draw(lo_hi: tuple[int, int], k: int) -> list[int]:
        return [int(x) for x in rng.integers(lo_hi[0], lo_hi[1] + 1, size=k)]

    in_range = (max(1, int(input_len * (1 - range_ratio))), int(input_len * (1 + range_ratio)))
    out_range = (max(1, int(output_len * (1 - range_ratio))), int(output_len * (1 + range_ratio)))
    prompts = []
    for in_len, out_len in zip(draw(in_range, n), draw(out_range, n), strict=True):
        ids = [int(x) for x in rng.integers(0, vocab, size=in_len)]
        if as_ids:
            prompts.append(Prompt(ids, in_len, out_len))
            continue
        text = tok.decode(ids)
        for _ in range(16):
            ids = tok.encode(text)
            if len(ids) == in_len:
                break
            ids = ids[:in_len] if len(ids) > in_len else ids + [int(x) for x in rng.integers(0, vocab, size=in_len - len(ids))]
            text = tok.decode(ids)
        prompts.append(Prompt(text, len(tok.encode(text)), out_len))
    return prompts


# -- requests ------------------------------------------------------------------------------------------


async def sse_data(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The ``data:`` payloads of a server-sent event stream."""
    async for raw in resp.content:
        line = raw.strip()
        if line.startswith(b"data:"):
            yield line[5:].strip()


async def send(session: aiohttp.ClientSession, url: str, payload: dict[str, Any], p: Prompt, t0: float) -> Result:
    r = Result(p.input_len)
    start = time.perf_counter()
    r.start = start - t0
    tokens = 0
    finish = None
    try:
        async with session.post(url, json=payload) as resp:
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return r
            done = False
            async for data in sse_data(resp):
                now = time.perf_counter() - start
                if data == b"[DONE]":
                    done = True
                    break
                msg = json.loads(data)
                if msg.get("error"):
                    r.error = f"error event: {msg['error'].get('message', msg['error'])}"
                    break
                choices = msg.get("choices") or []
                usage = msg.get("usage") or {}
                count = usage.get("completion_tokens")
                new = (count - tokens) if count is not None else (1 if choices and choices[0].get("text") else 0)
                if new > 0:
                    tokens += new
                    r.chunk_times.append(now)
                    r.chunk_tokens.append(new)
                if choices and choices[0].get("finish_reason"):
                    finish = choices[0]["finish_reason"]
            r.e2e = time.perf_counter() - start
            r.output_len = tokens
            r.ttft = r.chunk_times[0] if r.chunk_times else 0.0
            if not r.error and not done:
                r.error = "the stream ended without [DONE]"
            elif not r.error and finish not in ("stop", "length"):
                r.error = f"finish_reason {finish!r}"
            elif not r.error and not r.chunk_times:
                r.error = "no tokens"
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:  # ValueError: bad JSON, huge line
        r.error = f"{type(e).__name__}: {e}"
    return r


def payload_for(p: Prompt, model: str, ignore_eos: bool) -> dict[str, Any]:
    return {
        "model": model, "prompt": p.prompt, "max_tokens": p.output_len, "temperature": 0.0, "stream": True,
        "ignore_eos": ignore_eos, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }


async def arrivals(n: int, rate: float, burstiness: float, seed: int) -> AsyncIterator[int]:
    """Request indices at a Poisson (burstiness 1) or gamma process of ``rate``; all at once if infinite."""
    rng = np.random.default_rng(seed + 1)
    for i in range(n):
        yield i
        if math.isfinite(rate) and i < n - 1:
            await asyncio.sleep(float(rng.gamma(burstiness, 1.0 / (rate * burstiness))))


async def run(args: argparse.Namespace, url: str, model: str, prompts: list[Prompt]) -> tuple[list[Result], float]:
    conn = aiohttp.TCPConnector(limit=args.max_concurrency or 0, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        first = prompts[0]
        probe = Prompt(first.prompt, first.input_len, min(first.output_len, 8))
        check = await send(session, url, payload_for(probe, model, args.ignore_eos), probe, time.perf_counter())
        if not check.ok:
            raise RuntimeError(f"the test request failed: {check.error}")
        bar = tqdm(total=len(prompts), disable=args.disable_tqdm, desc="bench serve")

        async def one(p: Prompt, t0: float) -> Result:
            if gate is None:
                r = await send(session, url, payload_for(p, model, args.ignore_eos), p, t0)
            else:
                async with gate:
                    r = await send(session, url, payload_for(p, model, args.ignore_eos), p, t0)
            bar.update(1)
            return r

        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(one(prompts[i], t0))
                 async for i in arrivals(len(prompts), args.request_rate, args.burstiness, args.seed)]
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        bar.close()
    return list(results), duration


# -- report --------------------------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, float]:
    """Mean, std, median and percentiles in milliseconds (zeros when there is nothing to measure)."""
    a = np.asarray(values, dtype=float) * 1000.0
    if a.size == 0:
        return {"mean": 0.0, "std": 0.0, "median": 0.0, **{f"p{q}": 0.0 for q in PERCENTILES}}
    values = a.tolist()
    return {"mean": float(a.mean()), "std": float(a.std()), "median": percentile(values, 50),
            **{f"p{q}": percentile(values, q) for q in PERCENTILES}}


def throughput_series(results: list[Result], duration: float) -> tuple[list[float], list[float], float]:
    """Output tokens/s in time bins over the run (bin start times, rates) and the bin width."""
    width = 1.0 if duration >= 20 else max(duration / 20, 0.05)
    bins = max(1, math.ceil(duration / width))
    counts = np.zeros(bins)
    for r in results:
        if r.ok:
            for t, n in zip(r.chunk_times, r.chunk_tokens, strict=True):
                counts[min(bins - 1, int((r.start + t) / width))] += n
    return [i * width for i in range(bins)], list(counts / width), width


def metrics(results: list[Result], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    total_in = sum(r.input_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    _, rates, _ = throughput_series(results, duration)
    m: dict[str, Any] = {
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration, "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "max_output_tokens_per_s": max(rates, default=0.0),
    }
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [t for r in ok if (t := r.tpot()) is not None],
        "itl": [x for r in ok for x in r.itls()],
        "itl_token": [x for r in ok for x in r.token_itls()],
        "e2el": [r.e2e for r in ok],
    }
    for name, values in series.items():
        for stat, v in summary(values).items():
            m[f"{stat}_{name}_ms"] = v
    return m


def print_report(m: dict[str, Any], args: argparse.Namespace) -> None:
    def line(label: str, value: Any) -> None:
        print(f"{label:<42}{value:<10.2f}" if isinstance(value, float) else f"{label:<42}{value:<10}")

    print("{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="))
    line("Traffic request rate:", args.request_rate)
    line("Maximum request concurrency:", args.max_concurrency or "none")
    line("Successful requests:", m["completed"])
    line("Failed requests:", m["failed"])
    line("Benchmark duration (s):", m["duration"])
    line("Total input tokens:", m["total_input_tokens"])
    line("Total generated tokens:", m["total_output_tokens"])
    line("Request throughput (req/s):", m["request_throughput"])
    line("Output token throughput (tok/s):", m["output_throughput"])
    line("Peak output token throughput (tok/s):", m["max_output_tokens_per_s"])
    line("Total token throughput (tok/s):", m["total_token_throughput"])
    for key, title, short in (("ttft", "Time to First Token", "TTFT"),
                              ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
                              ("itl", "Inter-token Latency (per chunk)", "ITL"),
                              ("itl_token", "Inter-token Latency (per token)", "ITL/token"),
                              ("e2el", "End-to-end Latency", "E2EL")):
        print("{s:{c}^50}".format(s=f" {title} ", c="-"))
        for stat in ("mean", "median", *(f"p{q}" for q in PERCENTILES[1:])):
            line(f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} {short} (ms):",
                 m[f"{stat}_{key}_ms"])
    print("=" * 50)


def plot(results: list[Result], duration: float, base: Path) -> list[Path]:
    """Latency CDFs and output tokens/s over time, as PNGs beside the JSON result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = (
        ("TTFT", {"TTFT": [r.ttft for r in ok]}),
        ("TPOT", {"TPOT": [t for r in ok if (t := r.tpot()) is not None]}),
        ("Inter-token latency", {"per chunk": [x for r in ok for x in r.itls()],
                                 "per token": [x for r in ok for x in r.token_itls()]}),
        ("End-to-end latency", {"E2E": [r.e2e for r in ok]}),
    )
    for ax, (title, curves) in zip(axes.flat, panels, strict=True):
        for label, values in curves.items():
            if values:
                xs = np.sort(np.asarray(values) * 1000.0)
                ax.plot(xs, np.arange(1, xs.size + 1) / xs.size, label=label)
        ax.set_title(f"{title} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    cdf = base.with_name(base.name + "_latency_cdf.png")
    fig.savefig(cdf, dpi=110)
    plt.close(fig)

    starts, rates, width = throughput_series(results, duration)
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.step(starts, rates, where="post", label="output tokens/s")
    ax.set_xlabel("seconds since the first request")
    ax.set_ylabel(f"output tokens/s ({width:.2g} s bins)")
    ax.grid(alpha=0.3)
    running = ax.twinx()
    t = np.linspace(0.0, duration, 400)
    running.plot(t, [sum(r.start <= x < r.start + r.e2e for r in ok) for x in t], color="tab:orange", alpha=0.6,
                 label="requests in flight")
    running.set_ylabel("requests in flight")
    fig.legend(loc="upper right")
    fig.tight_layout()
    tput = base.with_name(base.name + "_throughput.png")
    fig.savefig(tput, dpi=110)
    plt.close(fig)
    return [cdf, tput]


# -- command -------------------------------------------------------------------------------------------


def add_bench_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, without /v1")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory for the prompts (default: the model if it is a local directory, "
                        "else the default model's)")
    p.add_argument("--dataset", choices=["random"], default="random")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly in [len * (1 - r), len * (1 + r)]")
    p.add_argument("--prompt-ids", action="store_true", help="send token ids instead of text")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (default: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals (1: Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests end at EOS (default: always generate --output-len tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per request")
    p.add_argument("--result-dir", default="bench_results")
    p.add_argument("--result-filename", default=None, help="JSON file name (default: from rate and time)")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.add_argument("--label", default="tpserve", help="a name for this configuration in the result")
    p.add_argument("--disable-tqdm", action="store_true")


async def served_model(base_url: str) -> tuple[str, int | None]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        async with s.get(f"{base_url}/v1/models") as resp:
            resp.raise_for_status()
            card = (await resp.json())["data"][0]
    return card["id"], card.get("max_model_len")


def tokenizer_dir(args: argparse.Namespace, model: str) -> str:
    if args.tokenizer:
        return args.tokenizer
    if os.path.exists(os.path.join(model, "tokenizer.json")):
        return model
    from tpserve.model.default_model import default_model_path

    return str(default_model_path())


def bench_serve_main(args: argparse.Namespace) -> int:
    for name in ("input_len", "output_len", "num_prompts"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if not args.request_rate > 0 or (args.max_concurrency is not None and args.max_concurrency < 1):
        print("error: --request-rate must be > 0 and --max-concurrency >= 1", file=sys.stderr)
        return 2
    base_url = args.base_url.rstrip("/")
    try:
        model, max_len = asyncio.run(served_model(base_url))
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, KeyError, IndexError) as e:
        print(f"error: cannot list the models of {base_url}: {e}", file=sys.stderr)
        return 1
    model = args.model or model
    tok_dir = tokenizer_dir(args, model)
    prompts = random_prompts(Tokenizer(tok_dir), args.num_prompts, args.input_len, args.output_len,
                             args.random_range_ratio, args.seed, args.prompt_ids)
    print(f"{len(prompts)} random prompts of {args.input_len} tokens (tokenizer {tok_dir}), {args.output_len} "
          f"output tokens each, against {base_url}/v1/completions (model {model}, max_model_len {max_len})")
    try:
        results, duration = asyncio.run(run(args, f"{base_url}/v1/completions", model, prompts))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    m = metrics(results, duration)
    print_report(m, args)
    errors = [r.error for r in results if not r.ok]
    for e in sorted(set(errors))[:5]:
        print(f"failure ({errors.count(e)}x): {e}", file=sys.stderr)

    out_dir = Path(args.result_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g}"
    name = args.result_filename or f"{args.label}-{rate}qps-c{args.max_concurrency or 'inf'}-" \
                                   f"{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path = out_dir / name
    record = {
        "date": datetime.now().isoformat(timespec="seconds"), "label": args.label, "base_url": base_url,
        "model_id": model, "tokenizer": tok_dir, "dataset": args.dataset,
        "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
        "random_range_ratio": args.random_range_ratio, "request_rate": rate, "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency, "seed": args.seed, "ignore_eos": args.ignore_eos,
        **m,
        "requests": [asdict(r) for r in results],
    }
    path.write_text(json.dumps(record, indent=1))
    print(f"result: {path}")
    if args.plots:
        for png in plot(results, duration, path.with_suffix("")):
            print(f"plot: {png}")
    return 0 if m["completed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tpserve bench serve",
                                     description="Serving benchmark against an OpenAI-compatible server.")
    add_bench_serve_args(parser)
    return bench_serve_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

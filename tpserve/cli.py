"""``tpserve`` commands: generate, serve, bench, make-model, convert-default, trace, stacks."""

from __future__ import annotations

import argparse
import sys
import time

from tpserve.llm_args import add_engine_args, make_llm


def cmd_generate(args: argparse.Namespace) -> int:
    from tpserve import SamplingParams, WorkerStartupError

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)  # --seed: the engine's
    try:
        llm = make_llm(args)
    except (WorkerStartupError, ValueError) as e:  # ValueError: an engine option out of range
        print(f"error: the engine did not start: {e}", file=sys.stderr)
        return 1
    with llm:
        prompt = args.prompt
        if args.chat:
            if llm.tokenizer is None:
                print("error: this model has no tokenizer for --chat", file=sys.stderr)
                return 2
            prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        start = time.perf_counter()
        stream = llm.generate_stream(prompt, params)
        for chunk in stream:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        out = stream.output
        elapsed = time.perf_counter() - start
        sys.stdout.write("\n")
        ttft = out.metrics.ttft
        print(
            f"[{len(out.token_ids)} tokens in {elapsed:.2f} s, {len(out.token_ids) / elapsed:.1f} tok/s, "
            f"TTFT {ttft * 1000 if ttft is not None else float('nan'):.1f} ms, finish_reason={out.finish_reason}, "
            f"device={llm.info.get('device')}, tp={llm.info.get('tensor_parallel_size')}]",
            file=sys.stderr,
        )
        if out.error:
            print(f"error: {out.error}", file=sys.stderr)
            return 1
    return 0


def cmd_make_model(args: argparse.Namespace) -> int:
    from tpserve.model.default_model import default_model_path
    from tpserve.model.random_model import make_model

    tok = None if args.no_tokenizer else default_model_path()
    path = make_model(args.dir, args.arch, size=args.size, seed=args.seed, tokenizer_dir=tok)
    print(path)
    return 0


def cmd_convert_default(args: argparse.Namespace) -> int:
    from tpserve.model.default_model import default_model_path

    print(default_model_path())
    return 0


def cmd_trace(rest: list[str]) -> int:
    from tpserve.trace_view import main as trace_main

    return trace_main(rest)


def _delegate(prog: str, add_args, run, rest: list[str]) -> int:
    """Subcommands with heavy imports (FastAPI, matplotlib) parse their own options, loaded on use."""
    parser = argparse.ArgumentParser(prog=prog)
    add_args(parser)
    return run(parser.parse_args(rest))


def cmd_serve(rest: list[str]) -> int:
    from tpserve.server.run import add_serve_args, serve_main

    return _delegate("tpserve serve", add_serve_args, serve_main, rest)


def cmd_bench(rest: list[str]) -> int:
    kind, rest = (rest[0], rest[1:]) if rest else ("", [])
    if kind == "latency":
        from tpserve.bench.latency import add_bench_latency_args, bench_latency_main

        command = " ".join(["tpserve bench latency", *rest])
        return _delegate("tpserve bench latency", add_bench_latency_args,
                         lambda a: bench_latency_main(a, command), rest)
    if kind == "serve":
        from tpserve.bench.serve import add_bench_serve_args, bench_serve_main

        return _delegate("tpserve bench serve", add_bench_serve_args, bench_serve_main, rest)
    print("usage: tpserve bench {latency,serve} [options]", file=sys.stderr)
    return 2


def cmd_stacks(rest: list[str]) -> int:
    from tpserve.stacks import main as stacks_main

    return stacks_main(rest)


DELEGATED = {"serve": cmd_serve, "bench": cmd_bench, "trace": cmd_trace, "stacks": cmd_stacks}


def build_parser() -> argparse.ArgumentParser:
    """The parser of the commands that parse here (generate, make-model, convert-default)."""
    parser = argparse.ArgumentParser(prog="tpserve")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream a completion to the terminal")
    g.add_argument("prompt")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_engine_args(g)
    g.set_defaults(fn=cmd_generate)

    m = sub.add_parser("make-model", help="build a small random-weight model of a real architecture")
    m.add_argument("dir")
    m.add_argument("--arch", choices=["llama", "qwen2", "qwen3"], default="llama")
    m.add_argument("--size", default="tiny")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--no-tokenizer", action="store_true", help="do not copy the default model's tokenizer")
    m.set_defaults(fn=cmd_make_model)

    c = sub.add_parser("convert-default", help="convert the default model once and print its directory")
    c.set_defaults(fn=cmd_convert_default)

    # These parse their own options (see DELEGATED); listed here for the help text.
    sub.add_parser("trace", help="merge shutdown traces into one timeline: tpserve trace DIR")
    sub.add_parser("stacks", help="every rank's and the proxy's thread stacks, live, as one view: "
                   "tpserve stacks CONNECTION_FILE|PID")
    sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    sub.add_parser("bench", help="benchmarks: tpserve bench latency | tpserve bench serve")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        return DELEGATED[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

"""What every command that starts an ``LLM`` takes (``tpserve generate``, ``tpserve serve``): the engine's
options and the proxy's own, and the ``LLM`` they describe. A module of its own so that the CLI and the
server's command both import it, and not each other."""

from __future__ import annotations

import argparse
import dataclasses

from tpserve.engine_args import EngineArgs
from tpserve.proxy.llm import LLM


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine options (``EngineArgs``), and the proxy's: attach to running workers, start-up timeout."""
    EngineArgs.add_cli_args(p)
    p.add_argument("--connect", default=None, help="attach to workers through this connection file")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds the workers may take to start")


def make_llm(args: argparse.Namespace) -> LLM:
    engine = EngineArgs.from_cli_args(args)
    return LLM(connect=args.connect, startup_timeout=args.startup_timeout, **dataclasses.asdict(engine))

"""The engine's options, defined once. ``LLM(**kwargs)``, every ``tpserve`` command that starts an engine,
the worker's command line and the benchmarks all derive from ``EngineArgs``, so an option added here (one
``option(...)`` line) is reachable everywhere, with the same name, default, bounds and help.

Command-line spelling: ``--`` + the field name with dashes (``max_num_tokens`` -> ``--max-num-tokens``),
``--flag/--no-flag`` for booleans, plus the older short spellings kept as aliases (``--tp``,
``--no-overlap``). ``mpirun_args`` is one shlex-split string there (``--mpirun-args "--hostfile h"``).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


def option(default: Any, help: str, *, aliases: tuple[str, ...] = (), low: float | None = None,
           high: float | None = None, above: float | None = None, default_text: str | None = None) -> Any:
    """One engine option: its default (``default_text`` says what a None default means), help text, older
    flag spellings (for a boolean, spellings that turn it off), inclusive bounds ``low``/``high`` or an
    exclusive lower bound ``above``."""
    shown = default_text if default_text is not None else "" if default in (None, ()) else str(default)
    return field(default=default, metadata={"help": help, "aliases": aliases, "low": low, "high": high,
                                            "above": above, "shown": shown})


@dataclass
class EngineArgs:
    """Everything the workers are started with (``connect`` and ``startup_timeout`` are the proxy's own)."""

    model: str | None = option(None, "Hugging Face model directory (~ expanded) or hub id (Qwen/Qwen3-0.6B: from "
                               "the local cache or downloaded) (default: the built-in SmolLM2-135M-Instruct)")
    tensor_parallel_size: int = option(1, "tensor-parallel size: MPI ranks", aliases=("--tp",), low=1)
    device: str = option("auto", "cpu, cuda or auto (CUDA when present)")
    dtype: str = option("auto", "float32, bfloat16, float16 or auto (float32 on CPU, the checkpoint's on GPU)")
    max_batch_size: int | None = option(None, "most requests running at once", low=1,
                                        default_text="on GPU 256 (vLLM's max_num_seqs) or the KV pool's blocks, "
                                        "whichever is fewer; 16 on CPU")
    max_seq_len: int | None = option(None, "longest request, prompt + output", low=1,
                                     default_text="the model's context")
    max_num_tokens: int | None = option(None, "token budget of one step; longer prompts are chunked", low=1,
                                        default_text="8192 on GPU, 2048 on CPU, at least max_batch_size")
    max_chunk_tokens: int | None = option(None, "most prompt tokens of one request in one step, so a long "
                                          "prompt leaves room for the ones behind it", low=1,
                                          default_text="max_num_tokens / 4")
    stream_interval: int = option(1, "a stream gets its tokens every N tokens", low=1)
    seed: int = option(0, "seed of the sampling of requests that bring no seed of their own", low=0, high=2**63 - 1)
    enable_overlap: bool = option(True, "launch step k before the host has step k-1's tokens",
                                  aliases=("--no-overlap",))
    early_first_token: bool = option(True, "publish a first token as soon as the host has it")
    block_size: int = option(16, "tokens per KV cache block", low=1)
    kv_cache_tokens: int | None = option(None, "KV pool capacity in tokens", low=1,
                                         default_text="on GPU, what gpu_memory_utilization leaves after the weights "
                                         "and a profiling step; on CPU, max_batch_size requests of up to 4096 "
                                         "tokens, within a quarter of the free memory")
    gpu_memory_utilization: float = option(0.9, "share of the GPU's total memory for this engine's weights, "
                                           "activations and KV pool together with what others already use on it",
                                           above=0, high=1)
    enable_prefix_caching: bool = option(True, "share the KV blocks of common prompt prefixes")
    enforce_eager: bool = option(False, "never capture CUDA graphs")
    heartbeat_timeout: float = option(5.0, "seconds rank 0 waits without a word from its client: then an attached "
                                      "engine ends that client's session, and a spawned engine that cannot watch "
                                      "its proxy's process ends", above=0)
    mpirun_args: tuple[str, ...] = option((), "extra mpirun arguments (one string, shlex-split)")

    def __post_init__(self) -> None:
        """Checks every value against its field's type and bounds; ``ValueError`` names the field."""
        hints = _hints()
        for f in dataclasses.fields(self):
            setattr(self, f.name, _checked(f, hints[f.name], getattr(self, f.name)))
        if (self.max_num_tokens is not None and self.max_batch_size is not None
                and self.max_num_tokens < self.max_batch_size):
            raise ValueError(f"max_num_tokens={self.max_num_tokens} is below max_batch_size={self.max_batch_size}: "
                             "a step must hold one token of every running request; raise max_num_tokens or "
                             "lower max_batch_size")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, skip: Iterable[str] = (),
                     derived: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
        """Adds every option (but those in ``skip``) to ``parser``, each with ``dest`` = the field name.
        ``derived`` names options whose default the caller derives (parsed as None unless given), with
        the help text for that default; the caller passes its values to ``from_cli_args``."""
        group = parser.add_argument_group("engine options")
        hints, derived = _hints(), derived or {}
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            flag, meta, kind = _flag(f.name), f.metadata, _base(hints[f.name])
            default = None if f.name in derived else f.default
            shown = derived.get(f.name, meta["shown"])
            shown = f" (default: {shown})" if shown else ""
            if kind is bool:
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                   help=meta["help"] + shown)
                for alias in meta["aliases"]:
                    group.add_argument(alias, dest=f.name, action="store_false", help=f"same as --no-{flag[2:]}")
            elif kind is tuple:
                group.add_argument(flag, *meta["aliases"], dest=f.name, type=shlex.split, default=f.default,
                                   metavar="ARGS", help=meta["help"] + shown)
            else:
                group.add_argument(flag, *meta["aliases"], dest=f.name, type=kind, default=default,
                                   metavar={int: "N", float: "X"}.get(kind), help=meta["help"] + shown)
        return parser

    @classmethod
    def from_cli_args(cls, namespace: argparse.Namespace, **overrides: Any) -> EngineArgs:
        """The options parsed by a parser that ``add_cli_args`` set up; ``overrides`` win (the benchmarks
        set some per run). A skipped option takes its default."""
        values = {name: getattr(namespace, name) for name in cls.names() if hasattr(namespace, name)}
        return cls(**{**values, **overrides})

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any], caller: str) -> EngineArgs:
        """For ``LLM(**kwargs)``: a name that is no option raises ``TypeError`` naming it (and the options)."""
        unknown = sorted(set(kwargs) - set(cls.names()))
        if unknown:
            raise TypeError(f"{caller} got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                            f"the engine options are: {', '.join(cls.names())}")
        return cls(**kwargs)

    def to_cli_args(self) -> list[str]:
        """The command line that ``from_cli_args`` turns back into an equal ``EngineArgs`` (the workers'
        argv): every option that differs from its default, as ``--name=value``, so no value is taken
        for a flag."""
        argv = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            flag = _flag(f.name)
            if isinstance(value, bool):
                argv.append(flag if value else f"--no-{flag[2:]}")
            elif isinstance(value, tuple):
                argv.append(f"{flag}={shlex.join(value)}")
            else:
                argv.append(f"{flag}={value!r}" if isinstance(value, float) else f"{flag}={value}")
        return argv


def readme_signature() -> str:
    """``LLM(...)``'s signature with every option's default, as the README shows it (a test compares)."""
    def shown(v: Any) -> str:
        return f'"{v}"' if isinstance(v, str) else repr(v)

    opts = [f"{f.name}={shown(f.default)}" for f in dataclasses.fields(EngineArgs)]
    return f"LLM({', '.join(opts)}, connect=None, startup_timeout=300)"


def readme_flags() -> str:
    """Every option's flag, as the README lists them (a test compares)."""
    hints, items = _hints(), []
    for f in dataclasses.fields(EngineArgs):
        flag, kind, aliases = _flag(f.name), _base(hints[f.name]), f.metadata["aliases"]
        if kind is bool:
            text = f"`--[no-]{flag[2:]}`" + "".join(f" (or `{a}`)" for a in aliases)
        elif kind is tuple:
            text = f'`{flag} "ARGS"` (one string, split like a shell would)'
        else:
            meta = "DIR" if f.name == "model" else {int: "N", float: "X"}.get(kind, "S")
            text = f"`{flag} {meta}`" + "".join(f" (or `{a} {meta}`)" for a in aliases)
        items.append(text)
    return ", ".join(items[:-1]) + ", and " + items[-1]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(EngineArgs)


def _base(hint: Any) -> type:
    """``int | None`` -> int, ``tuple[str, ...]`` -> tuple."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return _base(args[0])
    return typing.get_origin(hint) or hint


def _checked(f: dataclasses.Field, hint: Any, value: Any) -> Any:
    kind, meta = _base(hint), f.metadata
    optional = type(None) in typing.get_args(hint)
    if value is None and optional:
        return None
    if kind is tuple:  # mpirun_args: a sequence of strings, or one string to split
        value = tuple(shlex.split(value)) if isinstance(value, str) else value
        if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{f.name}={value!r}: must be a sequence of strings")
        return tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        what = {int: "an integer", float: "a number", str: "a string", bool: "True or False"}[kind]
        raise ValueError(f"{f.name}={value!r}: must be {what}" + (" or None" if optional else ""))
    if kind in (int, float):
        low, high, above = meta["low"], meta["high"], meta["above"]
        if (low is not None and not value >= low) or (high is not None and not value <= high) or (
                above is not None and not value > above):
            bounds = [f"> {above}" if above is not None else "", f">= {low}" if low is not None else "",
                      f"<= {high}" if high is not None else ""]
            raise ValueError(f"{f.name}={value!r}: must be {' and '.join(b for b in bounds if b)}")
    return value


if __name__ == "__main__":  # python -m tpserve.engine_args: the README's option texts, to paste
    print(readme_signature())
    print(readme_flags())

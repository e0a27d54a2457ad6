"""One set of engine options: LLM's keyword arguments, every command's flags and the workers' argv all come
from ``EngineArgs`` and carry every option unchanged."""

import argparse
import dataclasses
import json
import subprocess
import sys

import pytest
from helpers import ROOT, built_model

from tpserve import LLM, SamplingParams
from tpserve.bench.latency import add_bench_latency_args
from tpserve.cli import build_parser
from tpserve.engine_args import EngineArgs
from tpserve.server.run import add_serve_args

# Every option away from its default, with values that break naive argv handling: spaces, "=", quotes,
# arguments that start with "-".
CHANGED = dict(
    model="/models/my model=v2", tensor_parallel_size=3, device="cpu", dtype="bfloat16", max_batch_size=5,
    max_seq_len=333, max_num_tokens=77, max_chunk_tokens=9, stream_interval=2, seed=2**40, enable_overlap=False,
    early_first_token=False, block_size=32, kv_cache_tokens=4096, gpu_memory_utilization=0.55,
    enable_prefix_caching=False, enforce_eager=True, mpirun_args=("--hostfile", "my hosts", "-x", "A='b c'"),
    heartbeat_timeout=2.5,
)


def test_changed_covers_every_option():
    defaults = EngineArgs()
    assert set(CHANGED) == set(EngineArgs.names())
    assert all(getattr(defaults, k) != v for k, v in CHANGED.items())


def parse(add_args, argv: list[str]) -> EngineArgs:
    parser = argparse.ArgumentParser()
    add_args(parser)
    return EngineArgs.from_cli_args(parser.parse_args(argv))


def test_round_trip_through_argv():
    engine = EngineArgs.from_kwargs(CHANGED, "LLM()")
    argv = engine.to_cli_args()
    assert parse(EngineArgs.add_cli_args, argv) == engine
    assert EngineArgs().to_cli_args() == [] and parse(EngineArgs.add_cli_args, []) == EngineArgs()


def test_the_workers_parse_back_what_llm_passes():
    """The real worker command line (its own process: importing it initializes MPI)."""
    engine = EngineArgs(**CHANGED)
    code = ("import dataclasses, json, sys; from tpserve.worker.main import parse_args; "
            "e, w = parse_args(sys.argv[1:]); print(json.dumps([dataclasses.asdict(e), w.connection_file]))")
    r = subprocess.run([sys.executable, "-c", code, *engine.to_cli_args(), "--connection-file", "c.json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    parsed, conn = json.loads(r.stdout)
    assert EngineArgs(**parsed) == engine and conn == "c.json"
    r = subprocess.run([sys.executable, "-m", "tpserve.worker", "--block-size", "0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "block_size=0: must be >= 1" in r.stderr


def command_parser(command: str):
    """Parses a command's options as ``tpserve <command> ...`` would."""
    if command == "generate":
        return lambda argv: build_parser().parse_args(["generate", "a prompt", *argv])
    parser = argparse.ArgumentParser()
    {"serve": add_serve_args, "bench latency": add_bench_latency_args}[command](parser)
    return parser.parse_args


@pytest.mark.parametrize("command", ["generate", "serve", "bench latency"])
def test_every_command_takes_every_option(command):
    parse_command = command_parser(command)
    engine = EngineArgs(**CHANGED)
    # bench latency sets the model and the loop mode itself, per run
    per_run = {"model", "enable_overlap", "early_first_token"} if command == "bench latency" else set()
    argv = [a for a in engine.to_cli_args() if a.split("=")[0].removeprefix("--").removeprefix("no-").replace("-", "_")
            not in per_run]
    assert len(argv) == len(CHANGED) - len(per_run)
    assert EngineArgs.from_cli_args(parse_command(argv), **{k: CHANGED[k] for k in per_run}) == engine
    ns = parse_command(["--tp", "2", "--max-seq-len", "64"])  # the older spellings still work
    assert (ns.tensor_parallel_size, ns.max_seq_len) == (2, 64)
    if command != "bench latency":
        ns = parse_command(["--no-overlap", "--no-early-first-token"])
        assert ns.enable_overlap is False and ns.early_first_token is False


def test_unknown_and_bad_options_name_themselves():
    with pytest.raises(TypeError, match="'tensor_paralel_size'.*'use_graphs'"):
        LLM(tensor_paralel_size=2, use_graphs=True)
    for kwargs, field in [({"block_size": 0}, "block_size"), ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
                          ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization"),
                          ({"kv_cache_tokens": "many"}, "kv_cache_tokens"),
                          ({"enable_prefix_caching": "yes"}, "enable_prefix_caching"),
                          ({"max_num_tokens": 2.5}, "max_num_tokens"), ({"mpirun_args": [1]}, "mpirun_args"),
                          ({"seed": -1}, "seed"), ({"tensor_parallel_size": True}, "tensor_parallel_size")]:
        with pytest.raises(ValueError, match=f"^{field}="):
            LLM(**kwargs)
    assert EngineArgs(mpirun_args="--hostfile 'my hosts'").mpirun_args == ("--hostfile", "my hosts")


def test_options_reach_the_engine():
    """LLM kwargs -> mpirun and the workers' argv -> build_engine -> READY info, on real ranks."""
    options = dict(max_seq_len=64, max_num_tokens=48, block_size=32, kv_cache_tokens=512, gpu_memory_utilization=0.5,
                   enable_prefix_caching=False, enforce_eager=True, seed=7, stream_interval=2, max_batch_size=3,
                   heartbeat_timeout=7.5, mpirun_args=("-x", "TPSERVE_TEST_MARK=1"))
    with LLM(str(built_model("llama")), tensor_parallel_size=2, **options) as llm:
        assert llm.engine_args == EngineArgs(model=str(built_model("llama")), tensor_parallel_size=2, **options)
        shown = {k: llm.info[k] for k in options if k != "mpirun_args"}
        assert shown == {k: v for k, v in options.items() if k != "mpirun_args"}
        assert llm.info["tensor_parallel_size"] == 2
        out = llm.generate([1, 2, 3], SamplingParams(max_tokens=5, temperature=0))[0]
        assert len(out.token_ids) == 5 or out.finish_reason == "stop"
    assert dataclasses.asdict(llm.engine_args)["mpirun_args"] == ("-x", "TPSERVE_TEST_MARK=1")


def test_a_step_budget_below_the_batch_is_refused_clearly():
    with pytest.raises(ValueError, match="max_num_tokens=8 is below max_batch_size=16"):
        EngineArgs(max_num_tokens=8, max_batch_size=16)
    EngineArgs(max_num_tokens=16, max_batch_size=16)


def test_engine_options_given_with_connect_are_refused(tmp_path):
    """An attached engine runs with the options it was started with: options given here would be ignored."""
    from tpserve import wire

    conn = tmp_path / "engine.json"
    wire.ConnectionInfo("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", wire.new_key()).write(str(conn))
    with pytest.raises(ValueError, match="connect=.*max_batch_size, max_seq_len"):
        LLM(connect=str(conn), max_batch_size=8, max_seq_len=64)
    with pytest.raises(ValueError, match="connect=.*model"):
        LLM("some/model", connect=str(conn))


def test_the_worker_refuses_a_tensor_parallel_size_that_is_not_its_worlds(tmp_path):
    """The MPI world decides the size: a different --tensor-parallel-size is refused, not ignored."""
    from helpers import run_group

    from tpserve.proxy.launcher import mpi_environment, mpirun_path

    cmd = [mpirun_path(), "-n", "1", sys.executable, "-m", "mpi4py", "-m", "tpserve.worker", "--model",
           str(built_model("llama")), "--tensor-parallel-size", "2", "--connection-file", str(tmp_path / "c.json")]
    r = run_group(cmd, 120, env=mpi_environment(1))
    assert r.returncode != 0 and "--tensor-parallel-size 2 does not match the MPI world of 1" in r.stdout, r.stdout[-3000:]
    assert not (tmp_path / "c.json").exists()


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_the_readme_lists_every_option_as_engine_args_defines_it():
    """The README's LLM signature and its flag list are generated from EngineArgs (engine_args.readme_*):
    an option added, renamed or given another default shows here until the README says so."""
    from tpserve import engine_args

    readme = _flat((ROOT / "README.md").read_text(encoding="utf-8"))
    assert _flat(engine_args.readme_signature()) in readme, engine_args.readme_signature()
    assert _flat(engine_args.readme_flags()) in readme, engine_args.readme_flags()


def test_default_texts_say_what_the_engine_does():
    """The help's words for a derived default match the function that derives it."""
    from tpserve.executor.engine import (
        CPU_MAX_POOL_TOKENS_PER_REQUEST,
        default_max_batch_size,
        default_max_chunk_tokens,
        default_max_num_tokens,
        fit_batch_to_pool,
    )

    shown = {f.name: f.metadata["shown"] for f in dataclasses.fields(EngineArgs)}
    assert default_max_num_tokens("cuda", 16) == 8192 and default_max_num_tokens("cpu", 16) == 2048
    assert default_max_num_tokens("cpu", 4096) == 4096
    assert shown["max_num_tokens"] == "8192 on GPU, 2048 on CPU, at least max_batch_size"
    assert default_max_batch_size("cuda") == 256 and default_max_batch_size("cpu") == 16
    assert default_max_batch_size("cuda", max_num_tokens=128) == 128  # a given budget caps the default batch
    assert shown["max_batch_size"].startswith("on GPU 256") and shown["max_batch_size"].endswith("16 on CPU")
    assert fit_batch_to_pool(256, 101, given=False) == 100  # a small pool: one block a running request at least
    assert fit_batch_to_pool(256, 101, given=True) == 256 and fit_batch_to_pool(256, 9000, given=False) == 256
    assert default_max_chunk_tokens(2048) == 512 and shown["max_chunk_tokens"] == "max_num_tokens / 4"
    assert str(CPU_MAX_POOL_TOKENS_PER_REQUEST) in shown["kv_cache_tokens"] and "gpu_memory_utilization" in shown[
        "kv_cache_tokens"]
    readme = _flat((ROOT / "README.md").read_text(encoding="utf-8"))
    assert "takes `gpu_memory_utilization` of the memory left after the weights" not in readme

"""The worker process: one tensor-parallel rank. Starts up in lock-step with the other ranks, runs
the executor loop on a thread, and tears down in a fixed order (loop joined, sockets, communicators)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import traceback

from mpi4py import MPI

from tpserve import wire
from tpserve.shutdown_trace import phase_timer, trace


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mpi4py -m tpserve.worker")
    p.add_argument("--model", default=None, help="Hugging Face model directory (default: the built-in model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--max-num-tokens", type=int, default=None,
                   help="token budget of one step (default: max(max_seq_len, 2048)); longer prompts are chunked")
    p.add_argument("--stream-interval", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-overlap", dest="enable_overlap", action="store_false")
    p.add_argument("--no-early-first-token", dest="early_first_token", action="store_false")
    p.add_argument("--connection-file", default=None, help="attach mode: bind and write this file")
    p.add_argument("--bind-host", default="127.0.0.1", help="attach mode: interface to bind")
    p.add_argument("--heartbeat-timeout", type=float, default=5.0)
    return p.parse_args(argv)


class StartupFailed(Exception):
    def __init__(self, message: str, tb: str, rank: int) -> None:
        super().__init__(message)
        self.tb = tb
        self.rank = rank


def _stage(comm: MPI.Comm, name: str, fn):
    """Runs one start-up stage on every rank; if any rank failed, every rank raises the first error."""
    result, err = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - reported to the proxy with its traceback
        err = (f"{type(e).__name__}: {e}", traceback.format_exc())
    errors = comm.allgather(err)
    for rank, e in enumerate(errors):
        if e is not None:
            raise StartupFailed(f"rank {rank} failed at {name}: {e[0]}", e[1], rank)
    return result


def build_engine(args: argparse.Namespace, comm: MPI.Comm, publish):
    """Loads this rank's shard and returns (executor, info for READY)."""
    import torch

    from tpserve.executor.dist import init_tensor_parallel, pick_device, pick_dtype
    from tpserve.executor.executor import Executor, ExecutorConfig
    from tpserve.executor.instrument import make_instruments
    from tpserve.executor.model_runner import ModelRunner
    from tpserve.executor.request_queue import RequestQueue
    from tpserve.executor.sampler import Sampler
    from tpserve.executor.scheduler import Scheduler
    from tpserve.model import KVCache, ModelConfig, TPContext, load_model
    from tpserve.model.default_model import default_model_path

    rank, size = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))

    def resolve():
        if args.model is not None:
            return str(args.model)
        return str(default_model_path()) if rank == 0 else None

    model_dir = comm.bcast(_stage(comm, "resolve_model", resolve), root=0)
    config = _stage(comm, "read_config", lambda: ModelConfig.from_dir(model_dir))
    _stage(comm, "check_tp", lambda: config.check_tp(size))
    device = _stage(comm, "pick_device", lambda: pick_device(args.device))
    dtype = _stage(comm, "pick_dtype", lambda: pick_dtype(args.dtype, config.torch_dtype, device))
    max_seq_len = args.max_seq_len or min(config.max_position_embeddings, 4096)
    _stage(comm, "init_tensor_parallel", lambda: init_tensor_parallel(comm, device))
    tp = TPContext(rank, size)
    model, _ = _stage(comm, "load_model", lambda: load_model(model_dir, tp, device, dtype))
    kv = _stage(comm, "allocate_kv_cache", lambda: KVCache(config, size, args.max_batch_size, max_seq_len, device, dtype))
    ex_config = ExecutorConfig(
        vocab_size=config.vocab_size,
        max_seq_len=max_seq_len,
        eos_token_ids=tuple(config.eos_token_ids),
        stream_interval=args.stream_interval,
        enable_overlap=args.enable_overlap,
        early_first_token=args.early_first_token,
    )
    executor = Executor(
        ex_config,
        RequestQueue(comm),
        # A budget of one prompt a step would admit one request per step: a burst of arrivals then waits
        # out as many steps before its first token (seen at concurrency 32 as seconds of queueing).
        Scheduler(args.max_batch_size, args.max_num_tokens or max(max_seq_len, 2048)),
        ModelRunner(model, kv, device),
        Sampler(device, args.seed),
        publish,
        device,
        *make_instruments(comm),
    )
    info = {
        "model_dir": model_dir,
        "arch": config.arch,
        "vocab_size": config.vocab_size,
        "eos_token_ids": list(config.eos_token_ids),
        "max_seq_len": max_seq_len,
        "max_batch_size": args.max_batch_size,
        "tensor_parallel_size": size,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "kv_cache_bytes_per_rank": kv.nbytes(),
        "enable_overlap": args.enable_overlap,
        "early_first_token": args.early_first_token and args.enable_overlap,
        "pid": os.getpid(),
    }
    return executor, info


def _die_of_signal(signum: int, frame: object) -> None:
    """Until the loop runs there is nothing to drain: trace the exit, then die of the signal as before."""
    trace("worker", "signal", signum=signum)
    trace("worker", "exit", code=-signum)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def main(argv: list[str] | None = None) -> int:
    """Runs this rank. Every way out that a process can still take traces ``worker exit`` (a return, an
    exception, a signal before the loop, the abort after a loop failure), so a trace's verdict is true."""
    args = parse_args(argv)
    # The socket threads beside the busy loop need the GIL to send: at the default 5 ms switch interval
    # a response waits up to 5 ms behind the loop's Python work, most of a CPU step's TTFT.
    sys.setswitchinterval(0.0005)
    comm = MPI.COMM_WORLD
    os.environ.setdefault("TPSERVE_RANK", str(comm.Get_rank()))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _die_of_signal)
    trace("worker", "start", tp=comm.Get_size())
    try:
        code = _run(args, comm)
    except BaseException as e:
        trace("worker", "exit", code=1, error=f"{type(e).__name__}: {e}")
        raise
    trace("worker", "exit", code=code)
    return code


def _run(args: argparse.Namespace, comm: MPI.Comm) -> int:
    rank = comm.Get_rank()
    io = None
    if rank == 0:
        from tpserve.worker.rank0_io import Rank0IO

        attach = args.connection_file is not None
        if attach:
            conn = wire.ConnectionInfo(f"tcp://{args.bind_host}:*", f"tcp://{args.bind_host}:*", wire.new_key())
        else:
            conn = wire.ConnectionInfo(
                os.environ[wire.ENV_REQUEST_ADDR], os.environ[wire.ENV_RESPONSE_ADDR],
                bytes.fromhex(os.environ[wire.ENV_KEY]),
            )
        io = Rank0IO(conn, bind=attach, heartbeat_timeout=args.heartbeat_timeout)

    engine: list = []  # the executor, once built: its stats ride along with the publishes
    last_stats: list = [None, 0.0]

    def publish(deltas) -> None:
        if io is None:
            return
        stats = engine[0].stats() if engine else None
        now = time.monotonic()
        key = stats and (stats["running"], stats["waiting"], stats["shutting_down"])
        if stats is None or (key == last_stats[0] and now - last_stats[1] < 0.25):
            stats = None
        else:
            last_stats[:] = [key, now]
        if deltas or stats:
            io.send(wire.Outputs([d.to_dict() for d in deltas], stats))

    def on_sigterm(signum: int, frame: object) -> None:
        """Only sets things in motion: rank 0 enqueues the sentinel, which every rank then sees."""
        trace("worker", "signal", signum=signum)
        if rank == 0:
            engine[0].queue.put(wire.Shutdown(drain=False))

    conn_file = args.connection_file if io is not None else None

    def check_connection_file() -> None:
        if conn_file is not None and os.path.lexists(conn_file):
            raise wire.ConnectionInfo.taken(conn_file)

    def write_connection_file() -> None:
        if conn_file is not None:
            io.conn.write(conn_file)

    try:
        if args.connection_file is not None:  # a taken path fails the start before anything loads
            _stage(comm, "check_connection_file", check_connection_file)
        executor, info = build_engine(args, comm, publish)
        engine.append(executor)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_sigterm)
        if args.connection_file is not None:  # written once ready, so whoever reads it finds an engine
            _stage(comm, "write_connection_file", write_connection_file)
    except StartupFailed as e:
        trace("worker", "startup_failed", error=str(e))
        if io is not None:
            io.send(wire.StartupError(str(e), e.tb, e.rank))
            io.close()
        print(f"tpserve worker rank {rank}: {e}\n{e.tb}", file=sys.stderr, flush=True)
        return 1
    try:
        return _serve(executor, info, io, comm, conn_file)
    finally:
        _remove_connection_file(io, conn_file)


def _remove_connection_file(io, path: str | None) -> None:
    """Rank 0 removes its connection file (only if still its own) on every way out it controls."""
    if io is not None and path is not None and io.conn.remove(path):
        trace("worker", "connection_file_removed", path=path)


def _serve(executor, info: dict, io, comm: MPI.Comm, conn_file: str | None) -> int:
    """Runs the executor loop on a thread until the sentinel, then tears down in a fixed order."""
    rank = comm.Get_rank()
    if io is not None:
        ready = wire.Ready(info)
        if conn_file is None:
            io.send(ready)
        io.start_intake(executor.queue, ready)
    trace("worker", "ready")

    failure: list[BaseException] = []
    loop_done = threading.Event()

    def loop() -> None:
        try:
            executor.run()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            failure.append(e)
            traceback.print_exc()
        finally:
            loop_done.set()

    thread = threading.Thread(target=loop, name="executor-loop")
    thread.start()
    while not loop_done.wait(timeout=0.5):  # bounded waits keep the main thread responsive to signals
        pass
    thread.join()
    trace("executor_loop", "thread_joined", iterations=executor.iteration)
    _remove_connection_file(io, conn_file)  # the engine takes no more work: no proxy may attach now
    if failure:
        msg = f"rank {rank}: {type(failure[0]).__name__}: {failure[0]}"
        trace("worker", "loop_failed", error=msg)
        if io is not None:
            io.send(wire.EngineDead(msg, rank))
            io.close(timeout=1.0)
        print(f"tpserve worker {msg}", file=sys.stderr, flush=True)
        trace("worker", "exit", code=1, how="MPI_Abort")
        comm.Abort(1)  # the other ranks are blocked in a collective: end them all
    with phase_timer("worker", "cleanup"):
        if io is not None:
            io.send(wire.Goodbye("shutdown"))
            trace("worker", "proxy_threads_told_to_quit")
            io.close()
        if executor.events is not None:
            executor.events.close()
        executor.queue.close()
        from tpserve.executor.dist import destroy_tensor_parallel

        destroy_tensor_parallel()
        trace("worker", "torch_distributed_destroyed")
        comm.Barrier()  # every rank is through its teardown before MPI goes (mpi4py finalizes at exit)
        trace("worker", "communicators_destroyed")
    if io is not None and io.exit_watch is not None:
        io.exit_watch.stop()
    return 0

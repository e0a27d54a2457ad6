"""The worker process: one tensor-parallel rank. Starts up in lock-step with the other ranks, runs
the executor loop on a thread, and tears down in a fixed order (loop joined, sockets, CUDA graphs,
communicators)."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import signal
import sys
import threading
import time
import traceback

from mpi4py import MPI

from tpserve import stacks, wire
from tpserve.engine_args import EngineArgs
from tpserve.errors import PEER_LOSS
from tpserve.executor.engine import StartupFailed, build_engine
from tpserve.executor.engine import stage as _stage
from tpserve.model_path import resolve_model
from tpserve.shutdown_trace import trace
from tpserve.worker.publisher import Publisher
from tpserve.worker.teardown import teardown

PEER_LOSS_GRACE_S = 2.0  # how long a rank that lost a peer waits for mpirun to report that peer's death


def parse_args(argv: list[str] | None) -> tuple[EngineArgs, argparse.Namespace]:
    """The engine options (``EngineArgs``, what ``LLM`` passes as ``to_cli_args()``) and the worker's own.
    ``--tensor-parallel-size`` defaults to the MPI world's size (``main`` refuses another); ``--mpirun-args``
    is the launcher's and is not used here."""
    p = argparse.ArgumentParser(prog="python -m mpi4py -m tpserve.worker")
    EngineArgs.add_cli_args(p, derived={"tensor_parallel_size": "the MPI world's size (mpirun -n)"})
    w = p.add_argument_group("worker options")
    w.add_argument("--connection-file", default=None, help="attach mode: bind, and write this file once ready")
    w.add_argument("--bind-host", default="127.0.0.1", help="attach mode: interface to bind")
    ns = p.parse_args(argv)
    if ns.tensor_parallel_size is None:
        ns.tensor_parallel_size = MPI.COMM_WORLD.Get_size()
    try:
        return EngineArgs.from_cli_args(ns), ns
    except ValueError as e:
        p.error(str(e))


def _die_of_signal(signum: int, frame: object) -> None:
    """Until the loop runs there is nothing to drain: trace the exit, then die of the signal as before."""
    trace("worker", "signal", signum=signum)
    trace("worker", "exit", code=-signum)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def main(argv: list[str] | None = None) -> int:
    """Runs this rank. Every way out that a process can still take traces ``worker exit`` (a return, an
    exception, a signal before the loop, the abort after a loop failure), so a trace's verdict is true."""
    args, opts = parse_args(argv)
    world = MPI.COMM_WORLD.Get_size()
    if args.tensor_parallel_size != world:  # every rank sees the same and leaves alike
        print(f"tpserve worker: --tensor-parallel-size {args.tensor_parallel_size} does not match the MPI world of "
              f"{world} rank(s) (mpirun -n {world}): the world decides the size; drop the option or start "
              f"mpirun -n {args.tensor_parallel_size}", file=sys.stderr, flush=True)
        return 2
    # The intake thread beside the busy loop needs the GIL to take a request in (responses leave from the
    # loop thread itself, see Rank0IO.send): at the default 5 ms switch interval a new request would wait
    # up to 5 ms behind the loop's Python work. The loop rarely has a rival, so a short interval is cheap.
    sys.setswitchinterval(0.0001)
    comm = MPI.COMM_WORLD
    os.environ.setdefault("TPSERVE_RANK", str(comm.Get_rank()))
    stacks.install()  # `tpserve stacks`: every thread's stack on a signal, also while wedged in a collective
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _die_of_signal)
    trace("worker", "start", tp=comm.Get_size())
    try:
        code = _run(args, opts, comm)
    except BaseException as e:
        trace("worker", "exit", code=1, error=f"{type(e).__name__}: {e}")
        raise
    trace("worker", "exit", code=code)
    return code


def _run(args: EngineArgs, opts: argparse.Namespace, comm: MPI.Comm) -> int:
    rank = comm.Get_rank()
    io = None
    if rank == 0:
        from tpserve.worker.rank0_io import Rank0IO

        attach = opts.connection_file is not None
        if attach:
            conn = wire.ConnectionInfo(f"tcp://{opts.bind_host}:*", f"tcp://{opts.bind_host}:*", wire.new_key())
        else:
            conn = wire.ConnectionInfo(
                os.environ[wire.ENV_REQUEST_ADDR], os.environ[wire.ENV_RESPONSE_ADDR],
                bytes.fromhex(os.environ[wire.ENV_KEY]),
            )
        io = Rank0IO(conn, bind=attach, heartbeat_timeout=args.heartbeat_timeout)

    publish = Publisher(io)  # holds the executor once it is built, for its stats and the signal handler

    def on_sigterm(signum: int, frame: object) -> None:
        """Only sets things in motion: rank 0 enqueues the sentinel, which every rank then sees."""
        trace("worker", "signal", signum=signum)
        if rank == 0 and publish.executor is not None:
            publish.executor.queue.put(wire.Shutdown(drain=False))

    conn_file = opts.connection_file if io is not None else None

    def check_connection_file() -> None:
        if conn_file is not None and os.path.lexists(conn_file):
            raise wire.ConnectionInfo.taken(conn_file)

    def write_connection_file() -> None:
        if conn_file is not None:
            io.conn.write(conn_file)

    try:
        if opts.connection_file is not None:  # a taken path fails the start before anything loads
            _stage(comm, "check_connection_file", check_connection_file)
        if args.model is not None:  # given to the workers themselves (attach mode): ~ or a hub id, per host
            args.model = _stage(comm, "resolve_model_path", lambda: resolve_model(args.model))
        executor, info = build_engine(args, comm, publish)
        # READY reports every engine option: as given, unless the engine reports what it made of it
        info = {**{k: v for k, v in dataclasses.asdict(args).items() if k not in ("model", "mpirun_args")}, **info}
        publish.executor = executor
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_sigterm)
        if opts.connection_file is not None:  # written once ready, so whoever reads it finds an engine
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
    # What start-up built (the model's modules and tensors, kernels, graphs) lives as long as the process:
    # out of the collector's sight, so a full collection on the loop thread costs the loop's own garbage only.
    gc.collect()
    gc.freeze()
    if io is not None:
        ready = wire.Ready(info)
        io.stats = executor.stats
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
        if comm.Get_size() > 1 and PEER_LOSS.search(msg):
            # Most likely a peer died and broke the collective. mpirun names the rank that died, and how, only
            # if it notices that death before this rank's MPI_Abort: give it a moment (it ends this rank then).
            trace("worker", "peer_loss_grace", seconds=PEER_LOSS_GRACE_S)
            time.sleep(PEER_LOSS_GRACE_S)
        trace("worker", "exit", code=1, how="MPI_Abort")
        comm.Abort(1)  # the other ranks are blocked in a collective: end them all
    teardown(executor, io, comm)
    if io is not None and io.exit_watch is not None:
        io.exit_watch.stop()
    return 0

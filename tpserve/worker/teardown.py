"""A rank's teardown, in the one order that cannot hang or crash: the client told, sockets closed, debug
hooks and the request queue closed, CUDA graphs destroyed, the process group destroyed, then a barrier so
every rank is through before MPI finalizes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tpserve import wire
from tpserve.shutdown_trace import phase_timer, trace

if TYPE_CHECKING:
    from mpi4py import MPI

    from tpserve.executor.executor import Executor
    from tpserve.worker.rank0_io import Rank0IO


def teardown(executor: Executor, io: Rank0IO | None, comm: MPI.Comm) -> None:
    with phase_timer("worker", "cleanup"):
        if io is not None:
            io.send(wire.Goodbye("shutdown"))
            trace("worker", "proxy_threads_told_to_quit")
            io.close()
        executor.hooks.close()
        executor.queue.close()
        release_cuda_graphs(executor)
        from tpserve.executor.dist import destroy_tensor_parallel

        destroy_tensor_parallel()
        trace("worker", "torch_distributed_destroyed")
        comm.Barrier()  # every rank is through its teardown before MPI goes (mpi4py finalizes at exit)
        trace("worker", "communicators_destroyed")


def release_cuda_graphs(executor: Executor) -> None:
    """CUDA graphs captured with NCCL all-reduces inside hold the communicator's work: they are destroyed
    (after the device is idle) before the process group, or NCCL may tear down under a live graph."""
    graphs = executor.runner.graphs
    if graphs is None:  # CPU, eager mode, or no fused kernels: nothing was captured
        return
    import torch

    torch.cuda.synchronize(executor.device)
    count = len(graphs.graphs)
    graphs.close()
    trace("worker", "cuda_graphs_destroyed", graphs=count)

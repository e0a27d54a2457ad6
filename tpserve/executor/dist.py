"""Device choice and the torch.distributed group of the tensor-parallel ranks (rendezvous over MPI)."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
from mpi4py import MPI

DIST_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("TPSERVE_DIST_TIMEOUT", 120)))


def pick_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; rank r of a host takes GPU ``local_rank % count``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        local = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", os.environ.get("PMIX_LOCAL_RANK", 0)))
        index = local % max(torch.cuda.device_count(), 1)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if device != "cpu":
        raise ValueError(f"device={device!r}: expected 'auto', 'cuda' or 'cpu'")
    return torch.device("cpu")


def pick_dtype(dtype: str, config_dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (exact parity, and CPU bf16 matmuls are slow), the checkpoint's dtype on
    GPU, bfloat16 where that dtype is float32."""
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        dtype = config_dtype if config_dtype in ("bfloat16", "float16") else "bfloat16"
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype={dtype!r}: expected 'auto' or one of {sorted(names)}")
    return names[dtype]


def rendezvous_host(hosts: list[str]) -> str:
    """The address rank 0 (``hosts[0]``) offers the others for the torch.distributed rendezvous. Loopback
    when every rank shares its host; else ``MASTER_ADDR`` when set; else the source address of rank 0's
    route to another rank's host, which that host can reach back (a hostname's own entry in /etc/hosts is
    often 127.0.1.1 or 127.0.0.1, which would send the other hosts to themselves); else the hostname's
    address, when no other host's name resolves here."""
    if len(set(hosts)) == 1:
        return "127.0.0.1"
    if os.environ.get("MASTER_ADDR"):
        return os.environ["MASTER_ADDR"]
    other = next(h for h in hosts if h != hosts[0])
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((other, 9))  # a UDP connect sends nothing: it only picks the route
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(hosts[0])


def init_tensor_parallel(comm: MPI.Comm, device: torch.device) -> None:
    """All ranks of ``comm`` join one torch.distributed group: gloo on CPU, NCCL on CUDA. Rank 0 picks
    the address (``rendezvous_host``) and a free port, and broadcasts them.

    On CUDA, ``device_id`` binds the group to this rank's GPU, so the NCCL communicator is created here,
    eagerly, before anything is captured: a CUDA graph cannot create one. The first collectives run
    eagerly too (the profiling forward that sizes the KV pool, and each bucket's run before its capture),
    then the decode graphs are captured with their all-reduces inside. Every rank replays the same graph in a step because the bucket follows from the
    batch size, which the ranks share (see ``cuda_graphs``). ``destroy_tensor_parallel`` must come after
    the graphs are destroyed (the worker's teardown)."""
    if comm.Get_size() == 1:
        return
    hosts = comm.allgather(socket.gethostname())
    addr = None
    if comm.Get_rank() == 0:
        addr = rendezvous_host(hosts)
        with socket.socket() as s:
            s.bind((addr, 0))
            addr = f"tcp://{addr}:{s.getsockname()[1]}"
    addr = comm.bcast(addr, root=0)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=addr,
        rank=comm.Get_rank(),
        world_size=comm.Get_size(),
        timeout=DIST_TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )


def destroy_tensor_parallel() -> None:
    """Ends the group (and the NCCL communicator); CUDA graphs that captured its collectives go first."""
    if dist.is_initialized():
        dist.destroy_process_group()

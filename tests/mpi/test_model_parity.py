"""Tensor-parallel model on every rank (gloo, CPU, float32): greedy tokens equal Hugging Face's.

Run with: mpiexec -n 2 python -m mpi4py -m pytest --with-mpi -p no:cacheprovider tests/mpi/test_model_parity.py
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import hf_greedy, model_greedy
from mpi4py import MPI

from tpserve.model import SIZES, TPContext, load_model, make_model

PROMPTS = [
    [5, 17, 300, 42, 9, 1000, 77],
    [8],
    [400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 12],
]
MAX_NEW_TOKENS = 12
VOCAB = 1031  # prime: no TP size > 1 divides it, so the vocabulary shards are padded
MODELS = {"llama": False, "qwen2": True, "qwen3": True}  # arch -> tie_word_embeddings


@pytest.fixture(scope="module")
def tp() -> Iterator[TPContext]:
    """torch.distributed over gloo on all MPI ranks; rank 0 picks the port and broadcasts it."""
    comm = MPI.COMM_WORLD
    port = None
    if comm.rank == 0:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    port = comm.bcast(port, root=0)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=comm.rank, world_size=comm.size
    )
    yield TPContext(comm.rank, comm.size)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def built() -> Iterator[dict[str, tuple[Path, list[list[int]]]]]:
    """Rank 0 builds each random model and its Hugging Face greedy tokens; every rank gets both."""
    comm = MPI.COMM_WORLD
    root = Path(tempfile.mkdtemp(prefix="tpserve-parity-")) if comm.rank == 0 else None
    result = None
    if comm.rank == 0:
        result = {}
        for arch, tie in MODELS.items():
            path = make_model(root / arch, arch, "tiny", seed=2, vocab_size=VOCAB, tie_word_embeddings=tie)
            result[arch] = (path, [hf_greedy(path, p, MAX_NEW_TOKENS) for p in PROMPTS])
    result = comm.bcast(result, root=0)
    yield result
    comm.Barrier()
    if root is not None:
        shutil.rmtree(root)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("chunk", [None, 5], ids=["one-prefill", "chunked"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_tp_greedy_matches_hf(
    tp: TPContext, built: dict[str, tuple[Path, list[list[int]]]], arch: str, chunk: int | None
) -> None:
    if SIZES["tiny"]["num_key_value_heads"] % tp.size:
        pytest.skip(f"the tiny models' heads do not split over {tp.size} ranks")
    path, reference = built[arch]
    model, config = load_model(path, tp, "cpu", torch.float32)
    assert config.vocab_size % tp.size != 0
    assert model.model.embed_tokens.weight.shape[0] == -(-VOCAB // tp.size)
    tokens, logits = model_greedy(model, config, PROMPTS, MAX_NEW_TOKENS, chunk, tp.size)
    assert tokens == reference
    gathered = MPI.COMM_WORLD.allgather(logits)
    assert all(all(torch.equal(a, b) for a, b in zip(other, logits, strict=True)) for other in gathered)

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
from mpi4py import MPI

from tpserve.model import SIZES, AttentionMetadata, KVCache, ModelConfig, TPContext, load_model, make_model

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
            result[arch] = (path, _hf_greedy(path))
    result = comm.bcast(result, root=0)
    yield result
    comm.Barrier()
    if root is not None:
        shutil.rmtree(root)


def _hf_greedy(model_dir: Path) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    result = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        out = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS, do_sample=False
        )
        result.append(out[0, len(prompt) :].tolist())
    return result


def greedy(
    model: torch.nn.Module, config: ModelConfig, tp: TPContext, chunk: int | None
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy decoding of all prompts in one batch (prompts in chunks of up to `chunk` tokens, then decodes).

    Returns the tokens and every step's logits, to check that ranks agree bit for bit.
    """
    kv = KVCache(config, tp.size, len(PROMPTS), max(map(len, PROMPTS)) + MAX_NEW_TOKENS, "cpu", torch.float32)
    cached = [0] * len(PROMPTS)
    outputs: list[list[int]] = [[] for _ in PROMPTS]
    all_logits = []
    active = list(range(len(PROMPTS)))
    while active:
        pending = [(PROMPTS[i] + outputs[i])[cached[i] :][:chunk] for i in active]
        meta, positions = AttentionMetadata.build(
            active, [cached[i] for i in active], list(map(len, pending)), "cpu"
        )
        logits = model(torch.tensor(sum(pending, [])), positions, meta, kv)
        assert logits.shape == (len(active), config.vocab_size) and logits.dtype == torch.float32
        all_logits.append(logits)
        for row, (i, new) in enumerate(zip(active, pending, strict=True)):
            cached[i] += len(new)
            if cached[i] == len(PROMPTS[i]) + len(outputs[i]):
                outputs[i].append(int(logits[row].argmax()))
        active = [
            i
            for i in active
            if len(outputs[i]) < MAX_NEW_TOKENS
            and not (outputs[i] and outputs[i][-1] in config.eos_token_ids)
        ]
    return outputs, all_logits


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
    tokens, logits = greedy(model, config, tp, chunk)
    assert tokens == reference
    gathered = MPI.COMM_WORLD.allgather(logits)
    assert all(all(torch.equal(a, b) for a, b in zip(other, logits, strict=True)) for other in gathered)

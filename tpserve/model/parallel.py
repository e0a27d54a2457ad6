"""Tensor-parallel layers in the Megatron-LM layout.

Column-parallel layers split their output features over ranks and need no communication; the
row-parallel layer that follows splits its input features and sums the partial results with one
all-reduce. The vocabulary is split over ranks for both the embedding and the LM head.

Every layer loads its own shard from a full checkpoint tensor through `weight_loader`, which
accepts anything sliceable like a tensor (a safetensors slice, so a rank reads only its rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class Sliceable(Protocol):
    """A full checkpoint tensor that can be read in parts: a torch.Tensor or a safetensors slice."""

    def __getitem__(self, index: slice | tuple[slice, ...]) -> torch.Tensor: ...


@dataclass(frozen=True)
class TPContext:
    """This process's place in the tensor-parallel group (the default torch.distributed group).

    With size 1 nothing here touches torch.distributed, so a single process needs no init.
    """

    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is outside a tensor-parallel group of size {self.size}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums x over ranks in place; every rank ends up with the same bits."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenates every rank's x along the last dimension, in rank order."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=-1)


def _param(*shape: int) -> nn.Parameter:
    """An uninitialised, frozen parameter: inference only, every value comes from the checkpoint."""
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _check_shape(name: str, got: torch.Size, want: tuple[int, ...]) -> None:
    if tuple(got) != want:
        raise ValueError(f"{name}: checkpoint shard has shape {tuple(got)}, expected {want}")


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split into equal contiguous shards, one per rank.

    A vocabulary that tp does not divide is padded to a multiple of tp; padding rows are zero.
    Each rank embeds the ids in its shard, zeroes the rest, and an all-reduce sums the shards.
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPContext) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // tp.size)
        self.vocab_start = tp.rank * self.shard_size
        # Real (non-padding) rows in this rank's shard.
        self.num_real_rows = max(0, min(self.shard_size, vocab_size - self.vocab_start))
        self.weight = _param(self.shard_size, hidden_size)

    def weight_loader(self, param: nn.Parameter, source: Sliceable, shard_id: object = None) -> None:
        """Copies this rank's vocabulary rows and zeroes the padding rows."""
        rows = source[self.vocab_start : self.vocab_start + self.num_real_rows]
        _check_shape("vocab shard", rows.shape, (self.num_real_rows, param.shape[1]))
        param.data[: self.num_real_rows].copy_(rows)
        param.data[self.num_real_rows :].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.shard_size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """LM head sharded like the embedding: local logits, all-gather, drop the padding columns.

    The all-gather gives every rank the same full-vocabulary logits, so sampling agrees across ranks.
    """

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.all_gather_last_dim(F.linear(hidden, self.weight))
        return logits[..., : self.vocab_size]


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output features split over ranks; the output stays sharded."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, tp: TPContext) -> None:
        super().__init__()
        for size in output_sizes:
            if size % tp.size:
                raise ValueError(f"tensor_parallel_size={tp.size} does not divide output size {size}")
        self.tp = tp
        self.local_sizes = [size // tp.size for size in output_sizes]
        self.weight = _param(sum(self.local_sizes), input_size)
        self.bias = _param(sum(self.local_sizes)) if bias else None

    def _local_range(self, shard_id: int) -> tuple[int, int]:
        """(offset in this rank's fused output, rows) of logical sub-matrix shard_id."""
        return sum(self.local_sizes[:shard_id]), self.local_sizes[shard_id]

    def weight_loader(
        self, param: nn.Parameter, source: Sliceable, shard_id: int | str | None = None
    ) -> None:
        """Copies this rank's rows of the checkpoint tensor for sub-matrix shard_id."""
        index = self._shard_index(shard_id)
        offset, rows = self._local_range(index)
        part = source[self.tp.rank * rows : (self.tp.rank + 1) * rows]
        _check_shape("column shard", part.shape, (rows, *param.shape[1:]))
        param.data[offset : offset + rows].copy_(part)

    def _shard_index(self, shard_id: int | str | None) -> int:
        return 0 if shard_id is None else int(shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (gate and up: shard ids 0, 1)."""


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q, k and v projections, split by heads; shard ids "q", "k", "v"."""

    _SHARD_IDS = {"q": 0, "k": 1, "v": 2}

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, tp: TPContext
    ) -> None:
        super().__init__(
            hidden_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], bias, tp
        )

    def _shard_index(self, shard_id: int | str | None) -> int:
        return self._SHARD_IDS[str(shard_id)]


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input features split over ranks; an all-reduce sums the partial outputs.

    The bias is added once, after the reduction.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool, tp: TPContext) -> None:
        super().__init__()
        if input_size % tp.size:
            raise ValueError(f"tensor_parallel_size={tp.size} does not divide input size {input_size}")
        self.tp = tp
        self.local_input = input_size // tp.size
        self.weight = _param(output_size, self.local_input)
        self.bias = _param(output_size) if bias else None

    def weight_loader(self, param: nn.Parameter, source: Sliceable, shard_id: object = None) -> None:
        """Copies this rank's input columns of the weight; the bias is replicated."""
        if param is self.bias:
            part = source[:]
        else:
            start = self.tp.rank * self.local_input
            part = source[:, start : start + self.local_input]
        _check_shape("row shard", part.shape, tuple(param.shape))
        param.data.copy_(part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.linear(x, self.weight, self.bias)
        out = self.tp.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias

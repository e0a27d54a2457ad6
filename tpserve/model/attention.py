"""Attention over a paged KV cache for a flat batch that mixes decodes and prefill chunks.

The cache is a pool of blocks per layer, ``[num_blocks, block_size, kv_heads, head_dim]``; a sequence's
tokens live in the blocks its block table names. Block 0 is never given to a sequence: padding rows write
there, so kernels need no branch for them. One step is described by device tensors only (``AttentionMetadata``),
built on the host and sent with one packed copy, so the same metadata drives this plain-torch reference,
the Triton kernels and CUDA-graph replays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tpserve.kernels import reference
from tpserve.model.config import ModelConfig


def token_layout(tables: np.ndarray, starts: np.ndarray, qlens: np.ndarray,
                 block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query_start_loc [S + 1], positions [T], slot_mapping [T]) of a step whose sequence i brings qlens[i]
    new tokens from position starts[i], its blocks in row i of tables [>= S, W]: the one place eager steps
    (AttentionMetadata.build) and CUDA-graph steps (cuda_graphs.StepLayout) compute them."""
    s = len(qlens)
    qsl = np.zeros(s + 1, dtype=np.int64)
    np.cumsum(qlens, out=qsl[1:])
    seq_of_token = np.repeat(np.arange(s), qlens)
    positions = np.arange(int(qsl[-1])) - qsl[:-1][seq_of_token] + starts[seq_of_token]
    slots = tables[seq_of_token, positions // block_size] * block_size + positions % block_size
    return qsl, positions, slots


@dataclass
class AttentionMetadata:
    """One forward over T new tokens of S sequences; the first ``num_decodes`` sequences add one token each.

    Query i of sequence s sits at position ``seq_lens[s] - q_len[s] + i`` and attends causally to the
    sequence's keys 0..that position, read through ``block_tables[s]``."""

    query_start_loc: torch.Tensor  # int32 [S + 1]: where each sequence's queries start in T
    seq_lens: torch.Tensor  # int32 [S]: context length after this step (cached + new)
    block_tables: torch.Tensor  # int32 [S, W]: the blocks of each sequence, unused entries 0
    slot_mapping: torch.Tensor  # int32 [T]: block * block_size + offset, where each new token's k/v go
    last_token_index: torch.Tensor  # int32 [S]: index into T of each sequence's last new token
    num_decodes: int  # host scalars, not per sequence: sizes for the reference's padding
    max_query_len: int
    max_decode_seq_len: int
    max_prefill_seq_len: int
    input_ids: torch.Tensor | None = None  # int32 [T], when the step's tokens travelled with the metadata
    padded: bool = False  # a CUDA graph's bucket: tokens past query_start_loc[-1] and sequences with no query
    decodes_on_device: torch.Tensor | None = None  # int32 [1]: a padded step's count of leading decodes

    @classmethod
    def build(
        cls,
        block_tables: list[list[int]] | np.ndarray,
        start_positions: list[int] | np.ndarray,
        query_lens: list[int] | np.ndarray,
        block_size: int,
        device: torch.device | str,
        input_ids: list[int] | np.ndarray | None = None,
    ) -> tuple[AttentionMetadata, torch.Tensor]:
        """Builds the metadata and the positions tensor [T] with one host-to-device copy (pinned on CUDA, so
        the copy never waits for the device). ``input_ids`` [T], when given, travel in the same copy and land
        in ``meta.input_ids``. ``block_tables``: one list per sequence, or an array [S, >= the blocks the
        longest sequence needs] (the block manager's rows, zeros past each table).

        Sequence i's new tokens sit at positions start_positions[i] .. start_positions[i] + query_lens[i] - 1.
        Decodes (one new token) come first; ``num_decodes`` counts them."""
        s = len(query_lens)
        if not len(block_tables) == len(start_positions) == s:
            raise ValueError("block_tables, start_positions and query_lens must have the same length")
        if not s or min(query_lens) < 1:
            raise ValueError(f"every sequence needs at least one new token, got query_lens={list(query_lens)}")
        qlens = np.asarray(query_lens, dtype=np.int64)
        num_decodes = int(np.argmax(qlens != 1)) if (qlens != 1).any() else s
        starts = np.asarray(start_positions, dtype=np.int64)
        seq_lens = starts + qlens
        width = max(-(-int(seq_lens.max()) // block_size), 1)
        if isinstance(block_tables, np.ndarray):
            if block_tables.shape[1] < width:
                raise ValueError(f"block tables of {block_tables.shape[1]} blocks cannot hold {int(seq_lens.max())} "
                                 "tokens")
            tables = block_tables[:, :width].astype(np.int64)
        else:
            tables = np.zeros((s, width), dtype=np.int64)
            for i, table in enumerate(block_tables):
                need = -(-int(seq_lens[i]) // block_size)
                if len(table) < need:
                    raise ValueError(f"sequence {i}: {len(table)} blocks cannot hold {int(seq_lens[i])} tokens")
                tables[i, :need] = table[:need]
        qsl, positions, slots = token_layout(tables, starts, qlens, block_size)
        ids = np.asarray(input_ids if input_ids is not None else [], dtype=np.int64)
        parts = [qsl, seq_lens, qsl[1:] - 1, slots, positions, ids, tables.ravel()]
        host = torch.from_numpy(np.concatenate(parts).astype(np.int32))
        device = torch.device(device)
        if device.type == "cuda":
            host = host.pin_memory()
        packed = torch.split(host.to(device, non_blocking=True), [len(p) for p in parts])
        meta = cls(
            query_start_loc=packed[0],
            seq_lens=packed[1],
            block_tables=packed[6].view(s, width),
            slot_mapping=packed[3],
            last_token_index=packed[2],
            num_decodes=num_decodes,
            max_query_len=int(qlens.max()),
            max_decode_seq_len=int(seq_lens[:num_decodes].max()) if num_decodes else 0,
            max_prefill_seq_len=int(seq_lens[num_decodes:].max()) if num_decodes < s else 0,
            input_ids=packed[5] if input_ids is not None else None,
        )
        return meta, packed[4]


class KVCache:
    """The block pool: k and v of shape [num_layers, num_blocks, block_size, num_kv_heads_local, head_dim].

    Zero-filled so that never-written slots, which masked attention still multiplies by zero, are finite."""

    def __init__(
        self,
        config: ModelConfig,
        tp_size: int,
        num_blocks: int,
        block_size: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        config.check_tp(tp_size)
        shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads // tp_size, config.head_dim)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @staticmethod
    def bytes_per_block(config: ModelConfig, tp_size: int, block_size: int, dtype: torch.dtype) -> int:
        """K and V of one block in every layer, on one rank."""
        elements = 2 * config.num_layers * block_size * (config.num_kv_heads // tp_size) * config.head_dim
        return elements * torch.empty((), dtype=dtype).element_size()

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class Attention(nn.Module):
    """Writes a layer's new k/v into the pool, then attends every new query to its sequence's cache."""

    def __init__(self, layer: int, head_dim: int) -> None:
        super().__init__()
        self.layer = layer
        self.scale = head_dim**-0.5

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, kv: KVCache
    ) -> torch.Tensor:
        """q [T, Hq, D], k and v [T, Hkv, D] (local heads, RoPE applied) -> [T, Hq * D]."""
        k_cache, v_cache = kv.k[self.layer], kv.v[self.layer]
        reference.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.padded:
            out = reference.paged_attention(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens,
                                            meta.block_tables, self.scale, padded=True)
            return out.flatten(1)
        d = meta.num_decodes
        s = meta.seq_lens.shape[0]
        if d == s or d == 0:  # one kind of sequence: one call
            out = reference.paged_attention(
                q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, self.scale,
                meta.max_query_len, max(meta.max_decode_seq_len, meta.max_prefill_seq_len),
            )
            return out.flatten(1)
        # Decodes first (one query each), then the prefill chunks: two calls, so the decodes' rows are not
        # padded to the longest chunk.
        decode_out = reference.paged_attention(
            q[:d], k_cache, v_cache, meta.query_start_loc[: d + 1], meta.seq_lens[:d], meta.block_tables[:d],
            self.scale, 1, meta.max_decode_seq_len,
        )
        prefill_out = reference.paged_attention(
            q[d:], k_cache, v_cache, meta.query_start_loc[d:] - d, meta.seq_lens[d:], meta.block_tables[d:],
            self.scale, meta.max_query_len, meta.max_prefill_seq_len,
        )
        return torch.cat([decode_out, prefill_out]).flatten(1)

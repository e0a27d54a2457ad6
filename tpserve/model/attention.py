"""Attention over a contiguous per-slot KV cache for a flat batch that mixes prefill chunks and decodes."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from tpserve.model.config import ModelConfig


@dataclass
class AttentionMetadata:
    """Describes one forward over a flat batch of T new tokens from S sequences (prefill chunks and decodes mixed)."""

    slot_ids: torch.Tensor  # int64 [S] on device: KV cache slot (row) of each sequence
    context_lens: torch.Tensor  # int64 [S] on device: tokens in the cache after this step (cached + new)
    query_lens: list[int]  # host: new tokens of each sequence (sum == T)
    context_lens_host: list[int]  # host copy of context_lens
    token_slots: torch.Tensor  # int64 [T] on device: slot of each new token
    last_token_index: torch.Tensor  # int64 [S] on device: index into T of each sequence's last new token

    @classmethod
    def build(
        cls,
        slot_ids: list[int],
        start_positions: list[int],
        query_lens: list[int],
        device: torch.device | str,
    ) -> tuple[AttentionMetadata, torch.Tensor]:
        """Builds the metadata and the positions tensor [T] from host lists with one host->device copy.

        Sequence i's new tokens sit at positions start_positions[i] .. start_positions[i] + query_lens[i] - 1.
        """
        if not len(slot_ids) == len(start_positions) == len(query_lens):
            raise ValueError("slot_ids, start_positions and query_lens must have the same length")
        if not query_lens or min(query_lens) < 1:
            raise ValueError(f"every sequence needs at least one new token, got query_lens={query_lens}")
        context_lens = [start + n for start, n in zip(start_positions, query_lens, strict=True)]
        last_token_index = [end - 1 for end in accumulate(query_lens)]
        token_slots = [slot for slot, n in zip(slot_ids, query_lens, strict=True) for _ in range(n)]
        positions = [
            p for start, n in zip(start_positions, query_lens, strict=True) for p in range(start, start + n)
        ]
        device = torch.device(device)
        host = torch.tensor(
            slot_ids + context_lens + last_token_index + token_slots + positions,
            dtype=torch.int64,
            pin_memory=device.type == "cuda",
        )
        s, t = len(slot_ids), len(positions)
        packed = host.to(device, non_blocking=True)
        meta = cls(
            slot_ids=packed[:s],
            context_lens=packed[s : 2 * s],
            query_lens=list(query_lens),
            context_lens_host=context_lens,
            token_slots=packed[3 * s : 3 * s + t],
            last_token_index=packed[2 * s : 3 * s],
        )
        return meta, packed[3 * s + t :]

    @cached_property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token: one batched attention serves them all."""
        return max(self.query_lens) == 1

    @cached_property
    def decode_key_mask(self) -> torch.Tensor:
        """[S, 1, 1, L] bool, True where key position < context_len; shared by every layer of a forward."""
        keys = torch.arange(max(self.context_lens_host), device=self.context_lens.device)
        return (keys[None, :] < self.context_lens[:, None])[:, None, None, :]

    @cached_property
    def decode_group(self) -> DecodeGroup | None:
        """In a mixed step, the single-token sequences, attended in one batch instead of one by one (a step
        with any prefill would otherwise loop over every running sequence in every layer)."""
        rows = [i for i, n in enumerate(self.query_lens) if n == 1]
        if self.is_decode or len(rows) < 2:
            return None
        device = self.context_lens.device
        host = torch.tensor(rows, dtype=torch.int64, pin_memory=device.type == "cuda")
        index = host.to(device, non_blocking=True)
        context_lens = self.context_lens.index_select(0, index)
        max_len = max(self.context_lens_host[i] for i in rows)
        keys = torch.arange(max_len, device=device)
        return DecodeGroup(
            rows=set(rows),
            token_index=self.last_token_index.index_select(0, index),
            slot_ids=self.slot_ids.index_select(0, index),
            max_len=max_len,
            key_mask=(keys[None, :] < context_lens[:, None])[:, None, None, :],
        )

    @cached_property
    def prefill_masks(self) -> list[torch.Tensor | None]:
        """Per sequence: causal mask [q, ctx] offset by the cached prefix, or None when no mask is needed.

        None means plain causal attention (no cached prefix) or, for a single query, no masking at all.
        """
        masks: list[torch.Tensor | None] = []
        device = self.context_lens.device
        for n, ctx in zip(self.query_lens, self.context_lens_host, strict=True):
            if n == 1 or n == ctx:
                masks.append(None)
                continue
            queries = torch.arange(ctx - n, ctx, device=device)
            masks.append(torch.arange(ctx, device=device)[None, :] <= queries[:, None])
        return masks


@dataclass
class DecodeGroup:
    rows: set[int]  # sequence indices
    token_index: torch.Tensor  # [Sd] their tokens' indices into T
    slot_ids: torch.Tensor  # [Sd]
    max_len: int
    key_mask: torch.Tensor  # [Sd, 1, 1, max_len]


class KVCache:
    """Contiguous per-slot cache: k and v of shape [num_layers, num_slots, max_seq_len, num_kv_heads_local, head_dim].

    Zero-filled so that never-written positions, which masked attention still multiplies by zero, are finite.
    """

    def __init__(
        self,
        config: ModelConfig,
        tp_size: int,
        num_slots: int,
        max_seq_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        config.check_tp(tp_size)
        shape = (config.num_layers, num_slots, max_seq_len, config.num_kv_heads // tp_size, config.head_dim)
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class Attention(nn.Module):
    """Writes a layer's new k/v into the cache, then attends every new query to its sequence's cache."""

    def __init__(self, layer: int, head_dim: int) -> None:
        super().__init__()
        self.layer = layer
        self.scale = head_dim**-0.5

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv: KVCache,
    ) -> torch.Tensor:
        """q [T, Hq, D], k and v [T, Hkv, D] (local heads, RoPE applied) -> [T, Hq * D]."""
        k_cache, v_cache = kv.k[self.layer], kv.v[self.layer]
        k_cache[meta.token_slots, positions] = k
        v_cache[meta.token_slots, positions] = v
        if meta.is_decode:
            return self._decode(q, k_cache, v_cache, meta.slot_ids, max(meta.context_lens_host),
                                meta.decode_key_mask).flatten(1)
        return self._prefill(q, k, v, k_cache, v_cache, meta)

    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_ids: torch.Tensor,
        length: int, key_mask: torch.Tensor,
    ) -> torch.Tensor:
        """One query per sequence, all sequences in one attention: [S, Hq, D]."""
        keys = k_cache[slot_ids, :length].transpose(1, 2)
        values = v_cache[slot_ids, :length].transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=key_mask, scale=self.scale, enable_gqa=True
        )
        return out.squeeze(2)

    def _prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        group = meta.decode_group
        if group is not None:
            out[group.token_index] = self._decode(
                q.index_select(0, group.token_index), k_cache, v_cache, group.slot_ids, group.max_len, group.key_mask
            )
        start = 0
        for i, (n, ctx, mask) in enumerate(
            zip(meta.query_lens, meta.context_lens_host, meta.prefill_masks, strict=True)
        ):
            end = start + n
            if group is not None and i in group.rows:
                start = end
                continue
            if n == ctx:  # no cached prefix: the new k/v are the whole context
                keys, values = k[start:end], v[start:end]
            else:
                slot = meta.slot_ids[i : i + 1]
                keys = k_cache[:, :ctx].index_select(0, slot)[0]
                values = v_cache[:, :ctx].index_select(0, slot)[0]
            # 4-D [1, heads, tokens, head_dim]: the fused (flash) kernels take no other shape.
            seq_out = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1)[None],
                keys.transpose(0, 1)[None],
                values.transpose(0, 1)[None],
                attn_mask=mask,
                is_causal=n == ctx and n > 1,
                scale=self.scale,
                enable_gqa=True,
            )
            out[start:end] = seq_out[0].transpose(0, 1)
            start = end
        return out.flatten(1)

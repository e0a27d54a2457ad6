"""Turns a scheduled batch into model inputs (token ids and the paged-attention metadata, one packed copy)
and runs the forward pass of this rank's shard: a CUDA graph replay when graphs are captured (decode and
prompt steps alike), eagerly otherwise. A step that scores prompt positions (``prompt_logprobs``) needs the logits
of every such position, which the graphs do not return: it runs eagerly."""

from __future__ import annotations

import numpy as np
import torch

from tpserve.executor.block_manager import BlockManager
from tpserve.executor.cuda_graphs import CudaGraphs, table_array
from tpserve.executor.sampler import PromptLogits
from tpserve.executor.scheduler import ScheduledBatch
from tpserve.model import AttentionMetadata, KVCache, LlamaForCausalLM


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv: KVCache, blocks: BlockManager, device: torch.device,
                 graphs: CudaGraphs | None = None) -> None:
        self.model = model
        self.kv = kv
        self.blocks = blocks
        self.device = device
        self.graphs = graphs
        # The last forward's logits of the prompt positions it scored (prompt_logprobs), or None: read by the
        # executor when it launches that step's sampling.
        self.prompt_logits: PromptLogits | None = None

    @staticmethod
    def prompt_rows(batch: ScheduledBatch) -> tuple[list[int], list[int], list[tuple]]:
        """The new tokens whose logits score a prompt token (row in the step, the prompt token it predicts),
        and the (request, first position, end position) spans they belong to."""
        rows: list[int] = []
        targets: list[int] = []
        spans: list[tuple] = []
        offset = 0
        for seq in batch.seqs:
            req = seq.request
            if req.scores_prompt:
                prompt = req.prompt_token_ids
                lo, hi = seq.start_pos, min(seq.start_pos + seq.num_tokens, len(prompt) - 1)
                if hi > lo:
                    rows.extend(range(offset, offset + hi - lo))
                    targets.extend(prompt[lo + 1 : hi + 1])
                    spans.append((req, lo, hi))
            offset += seq.num_tokens
        return rows, targets, spans

    def step_tokens(self, batch: ScheduledBatch, prev_rows: dict[int, int] | None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """The step's input ids [T] (0 where a token is still on the device) and the (index in ids, row of the
        previous step's tokens) pairs [F, 2] of those tokens. A decode step (one token a sequence, the common
        case at every batch size) takes one pass without list slicing."""
        seqs = batch.seqs
        pending: list[int] = []
        if all(seq.num_tokens == 1 for seq in seqs):
            ids = np.zeros(len(seqs), dtype=np.int64)
            for i, seq in enumerate(seqs):
                req = seq.request
                pos, n_prompt = seq.start_pos, len(req.prompt_token_ids)
                if pos < n_prompt:
                    ids[i] = req.prompt_token_ids[pos]
                elif pos - n_prompt < len(req.output_token_ids):
                    ids[i] = req.output_token_ids[pos - n_prompt]
                else:  # the pending token: sampled last step, still on the device
                    assert prev_rows is not None
                    pending += (i, prev_rows[req.request_id])
            return ids, np.asarray(pending, dtype=np.int64).reshape(-1, 2)
        out: list[int] = []
        for seq in seqs:
            req = seq.request
            start, end = seq.start_pos, seq.start_pos + seq.num_tokens
            prompt, outputs = req.prompt_token_ids, req.output_token_ids
            n_prompt = len(prompt)
            out.extend(prompt[start:end])
            out.extend(outputs[max(start - n_prompt, 0) : max(end - n_prompt, 0)])
            if end > n_prompt + len(outputs):
                assert prev_rows is not None
                pending += (len(out), prev_rows[req.request_id])
                out.append(0)
        return np.asarray(out, dtype=np.int64), np.asarray(pending, dtype=np.int64).reshape(-1, 2)

    def step_tables(self, batch: ScheduledBatch, starts: np.ndarray, qlens: np.ndarray) -> np.ndarray:
        """The step's block tables [S, w], w the blocks its longest sequence needs: one gather from the block
        manager's persistent rows (lists only where the manager keeps none)."""
        seqs, blocks = batch.seqs, self.blocks
        w = max(int(-(-int((starts + qlens).max()) // blocks.block_size)), 1)
        if blocks.rows is None:
            return table_array([blocks.table_view(q.request.request_id)[:w] for q in seqs])
        index = np.fromiter((blocks.row(q.request.request_id) for q in seqs), dtype=np.int64, count=len(seqs))
        return blocks.rows[index, :w]

    @torch.inference_mode()
    def forward(
        self,
        batch: ScheduledBatch,
        prev_tokens: torch.Tensor | None = None,
        prev_rows: dict[int, int] | None = None,
    ) -> torch.Tensor:
        """Returns float32 logits [len(batch), vocab] of each sequence's last new token.

        A token that the previous step sampled and the host has not seen yet (overlap loop) is taken
        from ``prev_tokens[prev_rows[request_id]]`` on the device, so launching needs no host sync.
        """
        seqs = batch.seqs
        n = len(seqs)
        starts = np.fromiter((q.start_pos for q in seqs), dtype=np.int64, count=n)
        qlens = np.fromiter((q.num_tokens for q in seqs), dtype=np.int64, count=n)
        ids, from_device = self.step_tokens(batch, prev_rows)
        tables = self.step_tables(batch, starts, qlens)
        self.prompt_logits = None
        rows, targets, spans = self.prompt_rows(batch)
        key = self.graphs.pick(batch) if self.graphs is not None and not rows else None
        if key is not None:
            assert self.graphs is not None
            return self.graphs.replay(key, tables, starts, qlens, ids, from_device, prev_tokens)
        meta, positions = AttentionMetadata.build(tables, starts, qlens, self.blocks.block_size, self.device,
                                                  input_ids=ids)
        input_ids = meta.input_ids
        assert input_ids is not None
        if len(from_device):
            assert prev_tokens is not None
            pin = self.device.type == "cuda"
            index = torch.from_numpy(from_device)
            index = (index.pin_memory() if pin else index).to(self.device, non_blocking=pin)
            input_ids.index_copy_(0, index[:, 0], prev_tokens.index_select(0, index[:, 1]).int())
        if not rows:
            return self.model(input_ids, positions, meta, self.kv)
        pin = self.device.type == "cuda"
        extra = torch.tensor([rows, targets], dtype=torch.long, pin_memory=pin).to(self.device, non_blocking=pin)
        logits, prompt_logits = self.model(input_ids, positions, meta, self.kv, extra_rows=extra[0])
        self.prompt_logits = PromptLogits(prompt_logits, extra[1], spans)
        return logits

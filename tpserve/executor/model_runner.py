"""Turns a scheduled batch into model inputs (token ids and the paged-attention metadata, one packed copy)
and runs the forward pass of this rank's shard: a CUDA graph replay when graphs are captured (decode and
prompt steps alike), eagerly otherwise. A step that scores prompt positions (``prompt_logprobs``) needs the logits
of every such position, which the graphs do not return: it runs eagerly."""

from __future__ import annotations

import torch

from tpserve.executor.block_manager import BlockManager
from tpserve.executor.cuda_graphs import CudaGraphs
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
        ids: list[int] = []
        from_device: list[tuple[int, int]] = []  # (index in ids, row in prev_tokens)
        for seq in batch.seqs:
            req = seq.request
            start, end = seq.start_pos, seq.start_pos + seq.num_tokens
            prompt, outputs = req.prompt_token_ids, req.output_token_ids
            n_prompt = len(prompt)
            ids.extend(prompt[start:end])
            ids.extend(outputs[max(start - n_prompt, 0) : max(end - n_prompt, 0)])
            if end > n_prompt + len(outputs):  # the pending token: sampled last step, still on the device
                assert prev_rows is not None and prev_tokens is not None
                from_device.append((len(ids), prev_rows[req.request_id]))
                ids.append(0)
        self.prompt_logits = None
        rows, targets, spans = self.prompt_rows(batch)
        key = self.graphs.pick(batch) if self.graphs is not None and not rows else None
        if key is not None:
            return self.graphs.run(key, batch, ids, from_device, prev_tokens)
        meta, positions = AttentionMetadata.build(
            [self.blocks.table_view(s.request.request_id) for s in batch.seqs],
            [s.start_pos for s in batch.seqs],
            [s.num_tokens for s in batch.seqs],
            self.blocks.block_size,
            self.device,
            input_ids=ids,
        )
        input_ids = meta.input_ids
        assert input_ids is not None
        if from_device:
            pin = self.device.type == "cuda"
            index = torch.tensor(from_device, dtype=torch.long, pin_memory=pin).to(self.device, non_blocking=pin)
            input_ids.index_copy_(0, index[:, 0], prev_tokens.index_select(0, index[:, 1]).int())
        if not rows:
            return self.model(input_ids, positions, meta, self.kv)
        pin = self.device.type == "cuda"
        extra = torch.tensor([rows, targets], dtype=torch.long, pin_memory=pin).to(self.device, non_blocking=pin)
        logits, prompt_logits = self.model(input_ids, positions, meta, self.kv, extra_rows=extra[0])
        self.prompt_logits = PromptLogits(prompt_logits, extra[1], spans)
        return logits

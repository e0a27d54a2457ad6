"""The Llama family (Llama, Qwen2, Qwen3) with tensor-parallel layers.

Norms, RoPE and the residual order follow Hugging Face transformers operation by operation, so a
float32 model reproduces its greedy tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tpserve import kernels
from tpserve.kernels.policy import backend_for
from tpserve.model.attention import Attention, AttentionMetadata, KVCache
from tpserve.model.config import ModelConfig
from tpserve.model.parallel import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    TPContext,
    VocabParallelEmbedding,
)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight multiply, as Hugging Face does."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies in float32 on the CPU (even under a meta device context), with Llama 3 scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    )
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding:
    """cos/sin for the positions of one forward, computed in float32 (rotate-half layout).

    A plain object rather than a module so that casting the model to bfloat16 leaves inv_freq in float32.
    """

    def __init__(self, config: ModelConfig) -> None:
        self.inv_freq = rope_inv_freq(config)

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[:, None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by position, pairing dimension i with i + D/2 (Hugging Face's rotate_half)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, tp: TPContext) -> None:
        super().__init__()
        self.num_heads = config.num_heads // tp.size
        self.num_kv_heads = config.num_kv_heads // tp.size
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.head_dim,
            config.num_heads,
            config.num_kv_heads,
            config.attention_bias,
            tp,
        )
        # Qwen2 has biases on q/k/v only; Llama and Qwen3 put attention_bias on o_proj too.
        o_bias = config.attention_bias and config.arch != "qwen2"
        self.o_proj = RowParallelLinear(config.num_heads * config.head_dim, config.hidden_size, o_bias, tp)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.attn = Attention(layer, config.head_dim)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k and v [T, Hkv, D]: views of the fused projection's output."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        return (q.unflatten(-1, (self.num_heads, self.head_dim)), k.unflatten(-1, (self.num_kv_heads, self.head_dim)),
                v.unflatten(-1, (self.num_kv_heads, self.head_dim)))

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata, kv: KVCache
    ) -> torch.Tensor:
        q, k, v = self._qkv(x)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.o_proj(self.attn(q, k, v, meta, kv))

    def forward_fused(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                      meta: AttentionMetadata, kv: KVCache) -> torch.Tensor:
        """The GPU path: q/k norm, RoPE and the KV store in one kernel, then paged attention (Triton)."""
        q, k, v = self._qkv(x)
        layer = self.attn.layer
        k_cache, v_cache = kv.k[layer], kv.v[layer]
        q_norm = self.q_norm.weight if self.q_norm is not None else None
        k_norm = self.k_norm.weight if self.k_norm is not None else None
        eps = self.q_norm.eps if self.q_norm is not None else 0.0
        q = kernels.qk_norm_rope_store(q, k, v, positions, cos_sin, q_norm, k_norm, eps, k_cache, v_cache,
                                       meta.slot_mapping)
        out = kernels.paged_attention(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                      self.attn.scale, num_decodes=meta.num_decodes, padded=meta.padded,
                                      decodes_on_device=meta.decodes_on_device)
        return self.o_proj(out.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPContext) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], False, tp)
        self.down_proj = RowParallelLinear(size, config.hidden_size, False, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, tp: TPContext) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer, tp)
        self.mlp = LlamaMLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata, kv: KVCache
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, meta, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPContext) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, tp) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Llama, Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm before RoPE), sharded over tp ranks.

    Parameter names match Hugging Face's except the fused qkv_proj and gate_up_proj.
    """

    def __init__(self, config: ModelConfig, tp: TPContext) -> None:
        super().__init__()
        config.check_tp(tp.size)
        self.config = config
        self.model = LlamaModel(config, tp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        self.tie_weights()
        self.rotary = RotaryEmbedding(config)
        self.cos_sin: torch.Tensor | None = None  # set by use_fused_kernels: the GPU path

    def tie_weights(self) -> None:
        """Shares the embedding with the LM head when the config ties them (again after moving devices,
        which gives every module its own new tensor)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def use_fused_kernels(self, max_positions: int) -> bool:
        """Switches to the GPU path (Triton kernels, fused residual adds and norms) when the weights are on a
        GPU and triton imports; the plain-torch path stays the CPU's and the reference."""
        if backend_for(self.lm_head.weight) != "triton":
            return False
        self.cos_sin = kernels.build_cos_sin_cache(self.rotary.inv_freq.to(self.lm_head.weight.device),
                                                   max_positions)
        return True

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv: KVCache,
        logits_out: torch.Tensor | None = None, extra_rows: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Returns float32 logits [S, vocab_size] for the last new token of each sequence, identical on every rank.
        ``logits_out`` [S, vocab_size] float32, when given, receives them (the CUDA graphs' one shared output,
        written by the cast that would otherwise allocate a new tensor). ``extra_rows`` (int64 [P], indices of
        new tokens), when given, also asks for those tokens' logits: the answer is then ``(logits, extra)``
        (prompt log-probabilities score every prompt position)."""
        rows = meta.last_token_index
        if extra_rows is not None:
            rows = torch.cat([rows.long(), extra_rows.long()])
        if self.cos_sin is not None:
            h = self._hidden_fused(input_ids, positions, meta, kv, rows)
        else:
            x = self.model.embed_tokens(input_ids)
            rope = self.rotary(positions, x.dtype)
            for layer in self.model.layers:
                x = layer(x, rope, meta, kv)
            h = self.model.norm(x[rows])
        logits = self.lm_head(h)
        if extra_rows is not None:
            logits = logits.float()
            num_seqs = meta.last_token_index.shape[0]
            return logits[:num_seqs], logits[num_seqs:]
        return logits.float() if logits_out is None else logits_out.copy_(logits)

    def _hidden_fused(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv: KVCache,
        last: torch.Tensor,
    ) -> torch.Tensor:
        """The same math with each residual add fused into the norm that follows it (vLLM's layout)."""
        layers = self.model.layers
        residual = self.model.embed_tokens(input_ids)
        eps = self.config.rms_norm_eps
        h = kernels.rms_norm(residual, layers[0].input_layernorm.weight, eps)
        for i, layer in enumerate(layers):
            attn = layer.self_attn.forward_fused(h, positions, self.cos_sin, meta, kv)
            h, residual = kernels.add_rmsnorm(attn, residual, layer.post_attention_layernorm.weight, eps)
            mlp = layer.mlp.down_proj(kernels.silu_and_mul(layer.mlp.gate_up_proj(h)))
            if i + 1 < len(layers):
                h, residual = kernels.add_rmsnorm(mlp, residual, layers[i + 1].input_layernorm.weight, eps)
        # The final add and norm only for the rows the LM head reads (``last``: the last new tokens, and the
        # prompt positions scored when asked).
        h, _ = kernels.add_rmsnorm(mlp[last], residual[last], self.model.norm.weight, eps)
        return h

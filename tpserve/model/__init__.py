"""Tensor-parallel Llama/Qwen models, their KV cache, and Hugging Face checkpoint loading."""

from tpserve.model.attention import AttentionMetadata, KVCache
from tpserve.model.config import ModelConfig
from tpserve.model.llama import LlamaForCausalLM
from tpserve.model.loader import load_model
from tpserve.model.parallel import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    TPContext,
    VocabParallelEmbedding,
)
from tpserve.model.random_model import SIZES, make_model

__all__ = [
    "SIZES",
    "AttentionMetadata",
    "ColumnParallelLinear",
    "KVCache",
    "LlamaForCausalLM",
    "MergedColumnParallelLinear",
    "ModelConfig",
    "ParallelLMHead",
    "QKVParallelLinear",
    "RowParallelLinear",
    "TPContext",
    "VocabParallelEmbedding",
    "load_model",
    "make_model",
]

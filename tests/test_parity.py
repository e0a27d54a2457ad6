"""Greedy tokens identical to Hugging Face transformers on the same weights (float32, CPU)."""

import random

import pytest
from helpers import built_model, hf_greedy

from tpserve import LLM, SamplingParams

MAX_TOKENS = 12


def random_prompts(seed: int, lengths=(3, 17, 41), vocab: int = 49152) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("arch, tp", [("llama", 1), ("llama", 2), ("qwen2", 2), ("qwen3", 2)])
def test_random_model_matches_transformers(arch, tp):
    model = built_model(arch)
    prompts = random_prompts(tp * 10 + len(arch))
    with LLM(model=str(model), tensor_parallel_size=tp, max_seq_len=128) as llm:
        assert llm.info["vocab_size"] % tp != 0 or tp == 1  # padding of the vocab-parallel shards is exercised
        outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.error is None, out.error
        assert out.token_ids == hf_greedy(model, prompt, MAX_TOKENS), f"{arch} tp={tp} prompt len {len(prompt)}"
        assert len(set(out.token_ids)) > 1, "a degenerate random model would make this test weak"


@pytest.mark.parametrize("tp", [1, 3])
def test_default_model_matches_transformers(tp):
    from tpserve.model.default_model import default_model_path

    model = default_model_path()
    texts = [
        "The capital of France is",
        "Write a haiku about the sea.\nThe waves",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    ]
    with LLM(tensor_parallel_size=tp, max_seq_len=256) as llm:
        outs = llm.generate(texts, SamplingParams(max_tokens=16, temperature=0))
    for text, out in zip(texts, outs, strict=True):
        assert out.error is None, out.error
        assert out.prompt_token_ids == llm.tokenizer.encode(text)
        assert out.token_ids == hf_greedy(model, out.prompt_token_ids, 16), f"tp={tp} prompt {text!r}"
        assert out.text == llm.tokenizer.decode(out.token_ids)

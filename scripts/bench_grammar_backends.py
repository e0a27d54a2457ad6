"""Measures the two grammar backends the issue names, llguidance and xgrammar, on our tokenizer (SmolLM2's,
49,152 tokens; the test models' vocabulary is 49,157): tokenizer set-up once, compile time of a typical
JSON schema (cold), and the host time of one step's token masks at batch 1 and 64 while random walks advance
the matchers through the grammar (a random allowed token each step, as a random-weight model would pick).

    python scripts/bench_grammar_backends.py [--model DIR] [--steps 60]

xgrammar is optional (it pulls triton); a backend that does not import is skipped."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
        "role": {"enum": ["admin", "user", "guest"]},
        "scores": {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}


def _allowed(row: np.ndarray, vocab: int) -> np.ndarray:
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


def bench_llguidance(path: str, vocab: int, eos: int, batches: list[int], steps: int) -> dict[str, float]:
    import llguidance
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    tok = llguidance.LLTokenizer(Tokenizer.from_file(f"{path}/tokenizer.json").to_str(), n_vocab=vocab,
                                 eos_token=eos)
    out = {"tokenizer_s": time.perf_counter() - t0}
    opts = {"whitespace_flexible": False}
    schema = json.dumps(SCHEMA)
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=opts)
    m = llguidance.LLMatcher(tok, grammar)
    assert not m.is_error(), m.get_error()
    mask = np.zeros((1, (vocab + 31) // 32), dtype=np.int32)
    m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)  # the first mask builds the lexer lazily
    out["compile_ms"] = (time.perf_counter() - t0) * 1e3
    for b in batches:
        out[f"mask_ms_b{b}"] = _walk(b, steps, vocab,
                                     lambda: llguidance.LLMatcher(tok, grammar),
                                     lambda m, row: m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes),
                                     lambda m, t: m.consume_token(t), lambda m: m.is_stopped())
    return out


def bench_xgrammar(path: str, vocab: int, eos: int, batches: list[int], steps: int) -> dict[str, float]:
    import torch
    import xgrammar as xgr
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(path), vocab_size=vocab,
                                              stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    out = {"tokenizer_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    out["compile_ms"] = (time.perf_counter() - t0) * 1e3

    def fill(m, row: np.ndarray) -> None:
        t = torch.from_numpy(row.reshape(1, -1))
        m.fill_next_token_bitmask(t, 0)

    for b in batches:
        out[f"mask_ms_b{b}"] = _walk(b, steps, vocab, lambda: xgr.GrammarMatcher(compiled), fill,
                                     lambda m, t: m.accept_token(t), lambda m: m.is_terminated())
    return out


def _walk(batch: int, steps: int, vocab: int, new, fill, consume, stopped) -> float:
    """Median host time of one step's masks for ``batch`` matchers, each walked by random allowed tokens (a
    matcher that finishes starts over, so every step has ``batch`` live rows)."""
    rng = random.Random(0)
    matchers = [new() for _ in range(batch)]
    masks = np.zeros((batch, (vocab + 31) // 32), dtype=np.int32)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for i, m in enumerate(matchers):
            fill(m, masks[i])
        times.append(time.perf_counter() - t0)
        for i, m in enumerate(matchers):
            allowed = _allowed(masks[i], vocab)
            consume(m, int(allowed[rng.randrange(len(allowed))]))
            if stopped(m):
                matchers[i] = new()
    return statistics.median(times) * 1e3


def main() -> None:
    from tpserve.model.default_model import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a model directory with tokenizer.json (default: SmolLM2)")
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    path = str(args.model or default_model_path())
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(f"{path}/tokenizer.json")
    vocab = t.get_vocab_size() + 5
    eos = t.token_to_id("<|im_end|>") or 0
    for name, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
        try:
            res = fn(path, vocab, eos, [1, 64], args.steps)
        except ImportError as e:
            print(f"{name}: not installed ({e})")
            continue
        print(name, " ".join(f"{k}={v:.3f}" for k, v in res.items()), flush=True)


if __name__ == "__main__":
    main()

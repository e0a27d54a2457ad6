"""Structured output (issue 18) on a random-weight model, whose unconstrained output is noise, so only the
constraint can make it valid: JSON schemas, regexes, choices and a small grammar, greedy and sampled, batched
with unconstrained requests, at TP 1 and 2 in every loop mode; the failures that must end one request alone;
preemption; the pieces (params on the wire, the mask kernel, the matcher's rebuild) on their own."""

from __future__ import annotations

import json
import os
import re
import time

import jsonschema
import pytest
import torch
from helpers import built_model

from tpserve import LLM, SamplingParams, StructuredOutputs
from tpserve.executor.structured import Backend, GrammarManager, allowed_by_shifts, apply_token_bitmask

MODES = {
    "plain": {"enable_overlap": False},
    "overlap": {"enable_overlap": True, "early_first_token": False},
    "overlap+early": {"enable_overlap": True, "early_first_token": True},
}


def obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


SCHEMAS = [
    # nested objects, enums, integer and number ranges, bounded strings
    obj({"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
         "role": {"enum": ["admin", "user", "guest"]},
         "address": obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                         "geo": obj({"lat": {"type": "number", "minimum": -90, "maximum": 90}})})}),
    # arrays with bounds, optional fields, booleans
    obj({"tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 1, "maxItems": 3},
         "ok": {"type": "boolean"}, "score": {"type": "integer", "minimum": -5, "maximum": 5},
         "note": {"type": "string", "maxLength": 6}}, required=["tags", "ok"]),
    # an array of objects
    obj({"items": {"type": "array", "maxItems": 2,
                   "items": obj({"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                 "kind": {"enum": ["a", "b"]}})}}),
]
REGEXES = [r"[0-9]{3}-[a-z]{2,4}", r"(yes|no|maybe), [A-Z][a-z]{1,5}", r"#[0-9a-f]{6}"]
CHOICES = [["red", "green", "blue"], ["true", "false"], ["Paris", "London", "Berlin", "Madrid"]]
GRAMMAR = 'start: "add(" NUM ("," NUM)? ("," NUM)? ")"\nNUM: /[0-9]{1,4}/'
GRAMMAR_RE = re.compile(r"add\([0-9]{1,4}(,[0-9]{1,4}){0,2}\)")


def prompt(i: int) -> list[int]:
    return [(i * 7919 + j * 104729) % 49000 + 5 for j in range(3 + i % 9)]


def workload(n: int) -> list[tuple[list[int], SamplingParams, object]]:
    """``n`` requests: per 8, three JSON schemas, a regex, a choice, the grammar and two unconstrained
    neighbours; greedy and seeded sampling alternate."""
    out = []
    for i in range(n):
        kind = i % 8
        sampling = {"temperature": 0.0} if (i // 8) % 2 else {"temperature": 1.0, "seed": i}
        if kind < 3:
            so, check = StructuredOutputs(json_schema=SCHEMAS[kind]), ("json", SCHEMAS[kind])
        elif kind == 3:
            rx = REGEXES[i % len(REGEXES)]
            so, check = StructuredOutputs(regex=rx), ("regex", rx)
        elif kind == 4:
            ch = CHOICES[i % len(CHOICES)]
            so, check = StructuredOutputs(choice=ch), ("choice", ch)
        elif kind == 5:
            so, check = StructuredOutputs(grammar=GRAMMAR), ("grammar", None)
        else:
            out.append((prompt(i), SamplingParams(max_tokens=8, ignore_eos=True, **sampling), None))
            continue
        out.append((prompt(i), SamplingParams(max_tokens=160, structured=so, **sampling), check))
    return out


def check_output(text: str, check: tuple[str, object]) -> None:
    kind, what = check
    if kind == "json":
        jsonschema.validate(json.loads(text), what)
    elif kind == "regex":
        assert re.fullmatch(what, text), (text, what)
    elif kind == "choice":
        assert text in what, (text, what)
    else:
        assert GRAMMAR_RE.fullmatch(text), text


@pytest.mark.parametrize("tp", [1, 2])
def test_constrained_outputs_validate_and_neighbours_are_unchanged(tokenizer, tp):
    """200 requests a mode: every constrained output parses and validates; every unconstrained neighbour is
    exactly what it is without constrained neighbours (run alone in the first mode); streamed first chunks
    are the first token (early emission keeps working). TP 2 cross-checks every publish of the ranks."""
    work = workload(200)
    free = [(p, sp) for p, sp, check in work if check is None]
    os.environ["TPSERVE_CHECK_RANKS"] = "1"
    alone = None
    try:
        for mode, options in MODES.items():
            with LLM(model=str(built_model("llama")), tensor_parallel_size=tp, max_seq_len=256, max_batch_size=128,
                     **options) as llm:
                if alone is None:  # the same in every mode (the parity grid's guarantee): run once
                    alone = llm.generate([p for p, _ in free], [sp for _, sp in free], use_tqdm=False)
                streams = [llm.generate_stream(p, sp) for p, sp, _ in work]
                outs = [s.result(timeout=120) for s in streams]
                chunks = [list(s) for s in streams[:16]]
                assert llm.stats()["dead"] is None
            neighbours = [o for o, (_, _, check) in zip(outs, work, strict=True) if check is None]
            assert [o.token_ids for o in neighbours] == [o.token_ids for o in alone], mode
            for out, (_, sp, check) in zip(outs, work, strict=True):
                if check is None:
                    continue
                text = tokenizer.decode(out.token_ids)
                assert out.finish_reason == "stop", (mode, out.finish_reason, text, sp.structured)
                check_output(text, check)
            for c, out in zip(chunks, outs[:16], strict=True):
                assert c[0].token_ids == out.token_ids[:1] and sum((x.token_ids for x in c), []) == out.token_ids
    finally:
        del os.environ["TPSERVE_CHECK_RANKS"]


def slow_schema(n: int) -> dict:
    """A schema whose compile takes a while (hundreds of patterned properties), different for each ``n``."""
    return obj({f"p{n}_{i}": {"type": "string", "pattern": f"^[a-z]{{{i % 7 + 1}}}[0-9]{{2}}x{i}$"}
                for i in range(400)})


def test_failures_end_one_request_alone_and_preemption_rebuilds(tokenizer):
    """A grammar that cannot compile, a schema the backend rejects, a regex that does not parse: each ends
    its request alone with the backend's reason, beside requests that finish as usual; a request aborted
    while its grammar compiles ends as aborted; constrained requests preempted for KV blocks still give
    valid output; the engine serves on after each. TP 2: the failures end on every rank."""
    schema = SCHEMAS[0]
    with LLM(model=str(built_model("llama")), tensor_parallel_size=2, max_seq_len=256, max_batch_size=8,
             block_size=4, kv_cache_tokens=120) as llm:
        plain = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        good = SamplingParams(max_tokens=100, temperature=0, structured={"json_schema": schema})
        bad = [SamplingParams(max_tokens=8, structured={"grammar": "start: foo"}),
               SamplingParams(max_tokens=8, structured={"json_schema": {"type": "strin"}}),
               SamplingParams(max_tokens=8, structured={"regex": "a(b"})]
        outs = llm.generate([prompt(i) for i in range(6)], [plain, bad[0], good, bad[1], bad[2], plain],
                            use_tqdm=False)
        assert [o.finish_reason for o in outs] == ["length", "error", "stop", "error", "error", "length"]
        assert "unknown name" in outs[1].error and "grammar" in outs[1].error
        assert "Invalid type: strin" in outs[3].error and "json_schema" in outs[3].error
        assert "unclosed group" in outs[4].error and "regex" in outs[4].error
        jsonschema.validate(json.loads(tokenizer.decode(outs[2].token_ids)), schema)

        # aborted while compiling: a slow schema, aborted at once; the engine serves on
        slow = SamplingParams(max_tokens=50, structured={"json_schema": slow_schema(1)})
        start = time.monotonic()
        stream = llm.generate_stream(prompt(7), slow)
        llm.abort(stream.request_id)
        out = stream.result(timeout=60)
        assert out.finish_reason == "abort" and out.token_ids == []
        assert llm.generate([prompt(8)], plain, use_tqdm=False)[0].finish_reason == "length"
        assert time.monotonic() - start < 30

        # preemption: 8 constrained requests in a pool of 120 tokens (30 blocks of 4)
        before = llm.stats()["num_preemptions"]
        params = [SamplingParams(max_tokens=90, temperature=1.0, seed=i, structured={"json_schema": SCHEMAS[i % 3]})
                  for i in range(8)]
        outs = llm.generate([prompt(i) * 2 for i in range(8)], params, use_tqdm=False)
        assert llm.stats()["num_preemptions"] > before
        for out, sp in zip(outs, params, strict=True):
            assert out.finish_reason == "stop", (out.finish_reason, out.error)
            jsonschema.validate(json.loads(tokenizer.decode(out.token_ids)), sp.structured.json_schema)
        assert llm.stats()["dead"] is None


def test_json_object_whitespace_stop_strings_and_max_tokens(tokenizer):
    """json_object gives a JSON object (here greedy, which a random model ends at once or runs on: either
    way a JSON text without free whitespace); any_whitespace lets it in; max_tokens still bounds a
    constrained request; a stop token ends one."""
    with LLM(model=str(built_model("llama")), max_seq_len=256) as llm:
        outs = llm.generate([prompt(i) for i in range(12)],
                            [SamplingParams(max_tokens=40, temperature=0, structured={"json_object": True})
                             for _ in range(12)], use_tqdm=False)
        for out in outs:
            text = tokenizer.decode(out.token_ids)
            assert text.startswith("{")
            if out.finish_reason == "stop":
                assert isinstance(json.loads(text), dict)
            else:
                assert out.finish_reason == "length" and len(out.token_ids) == 40
        # any_whitespace lets whitespace in where JSON allows it; without it there is none
        array = {"type": "array", "maxItems": 3, "items": {"type": "integer", "minimum": -99, "maximum": 99}}
        ws = StructuredOutputs(json_schema=array, any_whitespace=True)
        spaced = [SamplingParams(max_tokens=60, temperature=1.0, seed=i, structured=ws) for i in range(24)]
        texts = [tokenizer.decode(o.token_ids) for o in llm.generate([prompt(i) for i in range(24)], spaced,
                                                                     use_tqdm=False)]
        assert any(re.search(r"\s", t) for t in texts), texts
        compact = [SamplingParams(max_tokens=60, temperature=1.0, seed=i, structured={"json_schema": ws.json_schema})
                   for i in range(24)]
        outs = llm.generate([prompt(i) for i in range(24)], compact, use_tqdm=False)
        for out in outs:
            text = tokenizer.decode(out.token_ids)
            assert out.finish_reason == "stop" and not re.search(r"\s", text), text
            assert isinstance(json.loads(text), list)
        # max_tokens bounds a constrained request; a stop token ends one
        long = llm.generate([prompt(1)], SamplingParams(max_tokens=3, temperature=0,
                                                        structured={"regex": "[a-z]{20}"}), use_tqdm=False)[0]
        assert long.finish_reason == "length" and len(long.token_ids) == 3
        first = long.token_ids[0]
        stopped = llm.generate([prompt(1)], SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[first],
                                                           structured={"regex": "[a-z]{20}"}), use_tqdm=False)[0]
        assert stopped.finish_reason == "stop" and stopped.token_ids == [first]


# -- the pieces on their own ---------------------------------------------------------------------------------


def test_params_shapes_bounds_and_the_wire():
    so = StructuredOutputs(json_schema=SCHEMAS[0])
    for sp in [SamplingParams(structured=so), SamplingParams(structured={"regex": "a+"}),
               SamplingParams(structured={"choice": ["a", "b"]}), SamplingParams(structured={"json_object": True}),
               SamplingParams(structured={"grammar": GRAMMAR, "any_whitespace": True}),
               SamplingParams(structured={"json_schema": json.dumps({"x": "é" * 5000})})]:
        back = SamplingParams.from_dict(sp.to_dict())
        assert back == sp and back.structured.key == sp.structured.key
        assert all(len(c.encode()) <= 4096 for c in sp.to_dict()["structured_spec"])  # the wire's string bound
    assert SamplingParams.from_dict(SamplingParams().to_dict()).structured is None
    for bad, why in [({}, "exactly one"), ({"regex": "a", "choice": ["a"]}, "exactly one"),
                     ({"regex": ""}, "non-empty"), ({"regex": "a" * 5000}, "at most 4096"),
                     ({"choice": []}, "1 to 256"), ({"choice": "ab"}, "list of strings"),
                     ({"json_schema": "{"}, "not JSON"), ({"json_schema": [1]}, "JSON object"),
                     ({"json_schema": {"d": "x" * 70000}}, "at most 65536"), ({"json_object": 1}, "must be True"),
                     ({"regex": "a", "any_whitespace": 1}, "bool"), ({"regexp": "a"}, "unknown field")]:
        with pytest.raises(ValueError, match=why):
            SamplingParams(structured=bad)


def test_bitmask_kernel_matches_a_loop():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 70, generator=gen)
    mask = torch.randint(-2**31, 2**31 - 1, (2, 2), dtype=torch.int32, generator=gen)  # 64 bits: 70 > 64
    out = apply_token_bitmask(logits, mask, torch.tensor([3, 1]))
    want = logits.clone()
    for j, row in enumerate([3, 1]):
        for t in range(70):
            if t >= 64 or not (int(mask[j, t // 32]) >> (t % 32)) & 1:
                want[row, t] = float("-inf")
    assert torch.equal(out, want)
    assert not torch.equal(out, logits)  # out of place: the raw logits stay
    everyone = torch.randint(-2**31, 2**31 - 1, (5, 3), dtype=torch.int32, generator=gen)
    out = apply_token_bitmask(logits, everyone, None)  # every row, in order
    assert torch.equal(out == float("-inf"), ~allowed_by_shifts(everyone, 70))  # the device path's unpacking
    assert torch.equal(out[~torch.isinf(out)], logits[~torch.isinf(out)])


class _Req:
    """What the manager reads of a request."""

    def __init__(self, so: StructuredOutputs) -> None:
        self.params = SamplingParams(structured=so)
        self.output_token_ids: list[int] = []
        self.finished = False


def test_matcher_rebuilds_to_match_tokens_and_the_cache(tokenizer):
    """A request whose tokens no longer extend what its matcher consumed (tokens taken back) gets a matcher
    rebuilt from the grammar's start; the same constraint twice compiles once."""
    path = built_model("llama")
    backend = Backend(str(path / "tokenizer.json"), 49157, [2])
    manager = GrammarManager(backend)
    try:
        so = StructuredOutputs(regex="(ab|cd)[0-9]{3}")
        a, b = _Req(so), _Req(so)
        manager.add(a)
        manager.add(b)
        assert manager.num_compiled == 1 and manager.num_cache_hits == 1
        deadline = time.monotonic() + 30
        ready: list = []
        while len(ready) < 2 and time.monotonic() < deadline:
            ready += manager.poll(wait=True)[0]
        assert ready == [a, b]
        ids = tokenizer.encode("ab12")
        a.output_token_ids = list(ids)
        assert manager.advance(a) == (False, None)
        a.output_token_ids = tokenizer.encode("cd")  # taken back and replaced: the matcher must start over
        assert manager.advance(a) == (False, None)
        logits = manager.mask_logits(torch.zeros(2, 49157), [a, b])
        allowed = [tokenizer.decode([t]) for t in torch.nonzero(logits[0] > float("-inf")).flatten().tolist()]
        assert allowed and all(s and s.isdigit() for s in allowed), allowed[:20]
        a.output_token_ids += tokenizer.encode("123")
        assert manager.advance(a) == (True, None)  # complete: nothing more fits
        a.output_token_ids += tokenizer.encode("x")  # a token the grammar forbids: an error, for a alone
        complete, error = manager.advance(a)
        assert error is not None and "structured output" in error
        assert manager.advance(b) == (False, None)
    finally:
        manager.close()

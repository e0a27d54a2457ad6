"""HTTP fuzzing of the OpenAI server: a real server over a real engine (tiny random Llama, TP 1) gets the
hand-picked hostile bodies of issue 8 and a few hundred bodies mutated from valid ones by a fixed-seed
generator, on both generation endpoints, streaming and not, 8 at a time. No answer may be a 5xx or
malformed, none may hang, the engine must stay alive and idle afterwards, and fixed greedy requests
answer the same before and after. docs/reliability.md records what it sends and what came back.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from helpers import built_model
from test_server import ServerProcess, sse, start_server

from tpserve.proxy.tokenizer import Tokenizer

SEED = 20261129
MUTATED = 400  # bodies from the generator, on top of the hand-picked ones
CONCURRENCY = 8
REQUEST_TIMEOUT_S = 30.0  # a request not answered by then is a hang
MAX_SEQ_LEN = 64  # bounds what an accepted body can cost: n x max_tokens never exceeds 64 x 63 tokens
MAX_BATCH_SIZE = 32
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
FIXED = {  # the greedy requests that must answer the same before and after the fuzzing
    COMPLETIONS: {"prompt": "The fuzzer was here", "max_tokens": 12, "temperature": 0, "ignore_eos": True},
    CHAT: {"messages": [{"role": "user", "content": "Still the same?"}], "max_tokens": 8, "temperature": 0,
           "ignore_eos": True},
}


class Raw:
    """A JSON text spliced into a body as is: what ``json.dumps`` cannot write (a 5,000-digit integer,
    20,000 nested brackets)."""

    def __init__(self, text: str) -> None:
        self.text = text


def dumps(body: Any) -> bytes:
    """``json.dumps`` (NaN and Infinity allowed, lone surrogates as \\u escapes), ``Raw`` values spliced in."""
    raws: list[str] = []

    def mark(v: Any) -> Any:
        if isinstance(v, Raw):
            raws.append(v.text)
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(v, dict):
            return {k: mark(x) for k, x in v.items()}
        if isinstance(v, list):
            return [mark(x) for x in v]
        return v

    text = json.dumps(mark(body))
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', raw, 1)
    return text.encode()


INTS = [0, 1, -1, 2, 3, 64, 65, MAX_SEQ_LEN - 1, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -2**63,
        -2**64, 10**30, Raw("1" + "0" * 5000)]
FLOATS = [0.0, -0.0, 0.5, 1.5, 1e-40, 5e-324, 1e-300, 1e308, float("inf"), float("-inf"), float("nan"),
          Raw("1e400"), Raw("-1e400")]
STRINGS = ["", "x", "5", "true", "\ud800", "a\udcffb", "a\x00b", "🙂" * 3, "x" * 600, "<|im_start|>user",
           "{{ raise_exception('x') }}", "data: [DONE]\n\n"]
OTHERS = [None, True, False, [], {}, [None], [1, 2**64], [-1], [0, 1], ["x"] * 17, [["x"]], [[1, 2], [3]], [[]],
          {"a": 1}, {"type": "text", "text": "x"}, {"include_usage": True}, {"continuous_usage_stats": 1},
          [{"role": "user", "content": "x"}], [{"role": "user", "content": [{"type": "image", "text": "x"}]}],
          Raw("[" * 20000 + "]" * 20000), Raw("{" * 3000), list(range(300)), [49156], [49157]]
VALUES = INTS + FLOATS + STRINGS + OTHERS
FIELDS = ["model", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "stop_token_ids",
          "ignore_eos", "stream", "stream_options", "user", "presence_penalty", "frequency_penalty",
          "repetition_penalty", "min_p", "logit_bias"]
EDGES = {  # valid values at the edges of each range, so that accepted bodies sample in odd ways too
    "max_tokens": [1, 3, 8], "temperature": [0, 1e-6, 1e-5, 0.3, 2.0, 1e4], "top_p": [1e-9, 0.5, 1.0],
    "top_k": [0, 1, 5, 49156, 49157, 10**9, 2**63 - 1], "n": [1, 2, 5], "seed": [0, 7, 2**63 - 1],
    "stop": ["e", ["\n", " "], ["the", "a", "🙂"], "x" * 512], "stop_token_ids": [[0], [2], list(range(16))],
    "ignore_eos": [True], "stream_options": [{"include_usage": True}, {"continuous_usage_stats": True}],
    "presence_penalty": [-2.0, 0.5, 2], "frequency_penalty": [-2, 0.0, 2.0], "repetition_penalty": [1e-9, 1.2, 10],
    "min_p": [0, 0.3, 1.0], "logit_bias": [{"0": 100}, {"49156": -100}, {"3": 5, "4": -5.5}, {str(i): 1 for i in range(300)}],
    "logprobs": [0, 5, 20, True], "top_logprobs": [0, 20], "echo": [True],
}
EXTRA_FIELDS = ["best_of", "suffix", "tools", "response_format", "", "\ud800"]


def base(path: str, rng: random.Random) -> dict[str, Any]:
    """A valid, cheap body (a few tokens) for ``path``, streaming or not."""
    body: dict[str, Any] = {"max_tokens": rng.randint(1, 4), "stream": rng.random() < 0.5,
                            "temperature": rng.choice([0, 0.7, 1.0])}
    if path == COMPLETIONS:
        body["prompt"] = rng.choice(["Hello", "你好世界🙂", [1, 2, 3], ["a", "b"], [[5], [6, 7]]])
    else:
        body["messages"] = [{"role": "user", "content": rng.choice(["Hi", "naïve café", [{"type": "text",
                                                                                           "text": "parts"}]])}]
    return body


def mutate(path: str, body: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """One to three changes: a field set to a hostile value or to the edge of its range, deleted, or added;
    a message or prompt broken."""
    body = copy.deepcopy(body)
    own = (["prompt", "logprobs", "echo"] if path == COMPLETIONS
           else ["messages", "max_completion_tokens", "add_generation_prompt", "logprobs", "top_logprobs"])
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        if op < 0.45:
            body[rng.choice(FIELDS + own)] = copy.deepcopy(rng.choice(VALUES))
        elif op < 0.75:
            field = rng.choice(sorted(EDGES))
            body[field] = copy.deepcopy(rng.choice(EDGES[field]))
        elif op < 0.82 and body:
            del body[rng.choice(sorted(body))]
        elif op < 0.9:
            body[rng.choice(EXTRA_FIELDS)] = copy.deepcopy(rng.choice(VALUES))
        elif path == CHAT and isinstance(body.get("messages"), list) and body["messages"]:
            msg = body["messages"][0]
            if isinstance(msg, dict):
                msg[rng.choice(["role", "content", "name", "tool_calls"])] = copy.deepcopy(rng.choice(VALUES))
            else:
                body["messages"] = [msg] * rng.choice([2, 300])
        elif path == COMPLETIONS:
            body["prompt"] = rng.choice([[rng.choice(INTS)], [body.get("prompt")] * rng.choice([2, 65]), [[]]])
    return body


def mangle(raw: bytes, rng: random.Random) -> bytes:
    """A byte-level change: truncated, a byte flipped or inserted, re-encoded, wrapped."""
    op = rng.randrange(6)
    i = rng.randrange(len(raw) + 1)
    if op == 0:
        return raw[:i]
    if op == 1 and raw:
        i = min(i, len(raw) - 1)
        return raw[:i] + bytes([rng.randrange(256)]) + raw[i + 1:]
    if op == 2:
        return raw[:i] + rng.choice([b"\xff", b"\x00", b"\xc3", b"\xed\xa0\x80", b"{", b'"', b"]", b",,"]) + raw[i:]
    if op == 3:
        return raw.decode().encode(rng.choice(["utf-16", "utf-16-le", "utf-32", "latin-1"]), "replace")
    if op == 4:
        return b"[" + raw + b"]"
    return raw + raw


def hand_picked(first_greedy: tuple[list[int], int]) -> list[tuple[str, bytes]]:
    """The cases of issue 8 and what they suggest, on both endpoints, streaming and not."""
    prompt, token = first_greedy
    changes: list[dict[str, Any]] = [
        {"top_k": 2**64}, {"top_k": 10**30}, {"top_k": 2**63 - 1}, {"top_k": 10**6}, {"top_k": -1},
        {"max_tokens": 2**64}, {"max_tokens": -(2**64)}, {"max_tokens": 2**63}, {"max_tokens": 0},
        {"stop_token_ids": [2**64]}, {"stop_token_ids": [2**63 - 1]}, {"stop_token_ids": [-1]},
        {"stop_token_ids": None}, {"stop_token_ids": "1"}, {"stop_token_ids": [1.0]}, {"stop_token_ids": list(range(17))},
        {"seed": 2**70}, {"seed": -1}, {"seed": 2**63 - 1}, {"n": 2**64}, {"n": -1}, {"n": 0},
        {"n": 64, "temperature": 1.0, "max_tokens": 2},  # many first tokens, some of them EOS
        {"n": 64, "max_tokens": 2**31}, {"n": 65}, {"n": 4, "max_tokens": None},  # chat: n x the whole context
        {"temperature": 1e-40}, {"temperature": 5e-324}, {"temperature": 1e308}, {"temperature": -1e-40},
        {"top_p": 5e-324}, {"top_p": 1e-300},
        {"model": "\ud800"}, {"model": "a\udcffb"}, {"user": "\ud800"}, {"model": None},
        {"stop": None}, {"stop": []}, {"stop": [""]}, {"stop": 7}, {"stop": [7]}, {"stop": {"a": "b"}},
        {"stop": ["\ud800"]}, {"stop": [["x"]]}, {"stop": ["x"] * 17}, {"stop": "y" * 513},
        {"logprobs": True}, {"logprobs": None}, {"top_logprobs": 5}, {"echo": False}, {"logprobs": 21},
        {"logprobs": -1}, {"logprobs": 2**64}, {"logprobs": 20, "top_logprobs": 20}, {"logprobs": True, "top_logprobs": 21},
        {"echo": True, "max_tokens": 0, "logprobs": 20}, {"echo": True, "max_tokens": 0, "n": 64, "logprobs": 1},
        {"echo": True, "max_tokens": 0}, {"echo": "yes"}, {"logprobs": 5, "temperature": 1e4, "n": 4},
        {"logit_bias": {"49157": 1}}, {"logit_bias": {"-1": 1}}, {"logit_bias": {"1.0": 1}}, {"logit_bias": {"": 1}},
        {"logit_bias": {"\ud800": 1}}, {"logit_bias": {"1": 100.5}}, {"logit_bias": {"1": float("nan")}},
        {"logit_bias": {str(i): 1 for i in range(301)}}, {"logit_bias": {"0" * 30: 1}}, {"logit_bias": [1]},
        {"logit_bias": {str(i): -100 for i in range(300)}, "temperature": 1.0},
        {"presence_penalty": 2.01}, {"frequency_penalty": float("-inf")}, {"repetition_penalty": 0},
        {"repetition_penalty": 10.5}, {"min_p": -0.1}, {"min_p": 1, "temperature": 1.0},
        {"presence_penalty": -2, "frequency_penalty": -2, "repetition_penalty": 1e-9, "logprobs": 3},
        {"stream_options": None}, {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
        {"stream_options": {"include_usage": "yes"}},
    ]
    bodies: list[tuple[str, bytes]] = []
    for stream in (False, True):
        for change in changes:
            bodies.append((COMPLETIONS, dumps({"prompt": "x", "max_tokens": 2, "stream": stream, **change})))
            bodies.append((CHAT, dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                        "stream": stream, **change})))
        # A request ended by its very first token, beside one that runs on in the same batch.
        bodies.append((COMPLETIONS, dumps({"prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": stream,
                                           "stop_token_ids": [token]})))
        bodies.append((COMPLETIONS, dumps({"prompt": [prompt, [7, 8]], "max_tokens": 8, "temperature": 0, "n": 3,
                                           "stream": stream, "stop_token_ids": [token]})))
        for messages in (None, [], [None], [{}], [{"role": "user"}], [{"role": "user", "content": None}],
                         [{"role": "user", "content": ""}], [{"role": "user", "content": []}],
                         [{"role": "assistant", "content": "x"}], [{"role": "user", "content": [{"type": "text"}]}],
                         [{"role": "user", "content": "\ud800"}], [{"role": "user", "content": "x"}] * 3000):
            bodies.append((CHAT, dumps({"messages": messages, "max_tokens": 2, "stream": stream})))
        for prompt_value in (None, "", [], [[]], [None], [2**64], [[1], [2**64]], [-1], [49157], [0], "\ud800",
                             ["x"] * 65, ["x", 1], [1, "x"], {"text": "x"}, "a" * 100_000):
            bodies.append((COMPLETIONS, dumps({"prompt": prompt_value, "max_tokens": 2, "stream": stream})))
    text = '{"prompt": "x", "max_tokens": 2}'
    for raw in (text.encode("utf-16"), text.encode("utf-16-le"), text.encode("utf-16-be"), text.encode("utf-32"),
                b"\xef\xbb\xbf" + text.encode(), b"", b"null", b"[]", b"7", b'"x"', b"{" * 100_000,
                b"[" * 100_000, b'{"prompt": "x", "prompt": 5}', b'{"prompt": "\\ud800\\udc00"}',
                b'{"prompt": "x\xff"}', b'{"prompt": "x", "max_tokens": NaN}', b"\x00" * 64):
        bodies += [(COMPLETIONS, raw), (CHAT, raw)]
    return bodies


def generated(rng: random.Random, count: int) -> list[tuple[str, bytes]]:
    bodies = []
    for _ in range(count):
        path = rng.choice([COMPLETIONS, CHAT])
        raw = dumps(mutate(path, base(path, rng), rng))
        bodies.append((path, mangle(raw, rng) if rng.random() < 0.15 else raw))
    return bodies


@dataclass
class Outcome:
    path: str
    body: bytes
    status: int | str  # an HTTP status, "timeout", or "transport: ..."
    streamed: bool = False
    problem: str | None = None  # an answer that is not what its status promises


async def send(http: httpx.AsyncClient, path: str, body: bytes, rng: random.Random) -> Outcome:
    """One request, bounded; a stream is read to its end, or hung up on after its first event (1 in 10)."""
    hang_up = rng.random() < 0.1

    async def go() -> Outcome:
        async with http.stream("POST", path, content=body, headers={"content-type": "application/json"}) as r:
            out = Outcome(path, body, r.status_code, "text/event-stream" in r.headers.get("content-type", ""))
            if out.streamed and r.status_code == 200:
                lines = []
                async for line in r.aiter_lines():
                    lines.append(line)
                    if hang_up and line.startswith("data:"):
                        return out
                out.problem = check_stream(lines)
            else:
                out.problem = check_json(r.status_code, await r.aread())
            return out

    try:
        return await asyncio.wait_for(go(), REQUEST_TIMEOUT_S)
    except (asyncio.TimeoutError, TimeoutError):
        return Outcome(path, body, "timeout")
    except httpx.TransportError as e:
        return Outcome(path, body, f"transport: {type(e).__name__}: {e}")


def check_json(status: int, content: bytes) -> str | None:
    try:
        answer = json.loads(content.decode("utf-8"))
    except ValueError as e:
        return f"not JSON in UTF-8: {e}"
    if status == 200:
        return None if answer.get("choices") and "usage" in answer else f"no choices or usage: {answer}"
    err = answer.get("error") if isinstance(answer, dict) else None
    if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"} or not err["message"]:
        return f"not an OpenAI error body: {answer}"
    return None


def check_stream(lines: list[str]) -> str | None:
    try:
        events = sse(lines)
    except ValueError as e:
        return f"an event is not JSON: {e}"
    if not events or events[-1] != "[DONE]":
        return f"no [DONE] at the end: {events[-2:]}"
    finals = [c["finish_reason"] for e in events[:-1] if "choices" in e for c in e["choices"] if c["finish_reason"]]
    return None if finals else "no choice finished"


async def fire(url: str, bodies: list[tuple[str, bytes]], rng: random.Random) -> list[Outcome]:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    gate = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=REQUEST_TIMEOUT_S) as http:

        async def one(path: str, body: bytes, seed: int) -> Outcome:
            async with gate:
                return await send(http, path, body, random.Random(seed))

        return await asyncio.gather(*(one(p, b, rng.randrange(2**32)) for p, b in bodies))


def fixed_answers(server: ServerProcess) -> dict[str, Any]:
    """The greedy texts of the fixed requests, streamed and not (they must agree)."""
    answers = {}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for path, body in FIXED.items():
            full = http.post(path, json=body)
            assert full.status_code == 200, full.text
            choice = full.json()["choices"][0]
            text = choice.get("text", choice.get("message", {}).get("content"))
            with http.stream("POST", path, json={**body, "stream": True}) as r:
                events = sse(list(r.iter_lines()))
            streamed = "".join(c.get("text", c.get("delta", {}).get("content") or "")
                               for e in events[:-1] for c in e["choices"])
            assert streamed == text, (path, streamed, text)
            answers[path] = text
    return answers


def first_greedy_token(server: ServerProcess) -> tuple[list[int], int]:
    """A prompt and its first greedy token, as an id (so a stop on it ends the request at its first token)."""
    tok = Tokenizer(built_model("llama"))
    for prompt in ("Once", "The", "a b c", "1 2 3", "你好"):
        ids = tok.encode(prompt)
        r = httpx.post(f"{server.url}{COMPLETIONS}", json={"prompt": ids, "max_tokens": 1, "temperature": 0}, timeout=60)
        text = r.json()["choices"][0]["text"]
        token = tok.encode(text)
        if text and len(token) == 1 and tok.decode(token) == text:
            return ids, token[0]
    pytest.fail("no prompt's first greedy token survives a decode and re-encode")


def test_http_fuzz_no_5xx_no_hang_engine_alive_same_answers(tmp_path):
    started = time.monotonic()
    server = start_server(tmp_path, "--max-seq-len", str(MAX_SEQ_LEN), "--max-batch-size", str(MAX_BATCH_SIZE))
    try:
        before = fixed_answers(server)
        rng = random.Random(SEED)
        bodies = hand_picked(first_greedy_token(server)) + generated(rng, MUTATED)
        outcomes = asyncio.run(fire(server.url, bodies, rng))
        assert server.proc.poll() is None, server.tail()
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200, server.tail()
        bad = [o for o in outcomes if not isinstance(o.status, int) or o.status >= 500 or o.problem]
        assert not bad, "\n".join(f"{o.path} {o.body[:200]!r}: {o.status} {o.problem}" for o in bad[:20])
        # No batch slot was lost (a request accepted and never ended, a hang-up never aborted): a full batch
        # of choices still runs to its end at once.
        full = httpx.post(f"{server.url}{COMPLETIONS}", json={"prompt": "x", "n": MAX_BATCH_SIZE, "max_tokens": 2,
                                                              "ignore_eos": True}, timeout=REQUEST_TIMEOUT_S)
        assert [c["finish_reason"] for c in full.json()["choices"]] == ["length"] * MAX_BATCH_SIZE, full.text
        assert fixed_answers(server) == before
        summary = Counter((o.path, o.streamed, o.status) for o in outcomes)
        print(f"\nHTTP fuzz: {len(bodies)} bodies in {time.monotonic() - started:.1f} s (with start-up)")
        for (path, streamed, status), count in sorted(summary.items(), key=str):
            print(f"  {path} {'stream' if streamed else 'json'} {status}: {count}")
    finally:
        assert server.stop() == 0, server.tail()

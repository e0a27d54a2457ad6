"""The OpenAI-compatible server as a real process on a loopback port: the official ``openai`` client, raw
HTTP for what a client should never send, 200 concurrent streams, disconnects, metrics, and SIGTERM.

One server (tiny random Llama, TP 1) serves the whole module; the SIGTERM test ends it, so it comes last.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from helpers import ROOT, built_model
from prometheus_client.parser import text_string_to_metric_families

from tpserve.proxy.tokenizer import IncrementalDetokenizer, Tokenizer
from tpserve.server.text import StopText

MAX_SEQ_LEN = 256
MODEL = str(built_model("llama"))  # the served name: the --model argument, as vLLM names it
MIXED = "Hello, 世界! 你好世界🙂 naïve café 👍🏽 Ωμέγα ∑ ✓ 日本語のテキスト 🇯🇵 done."


# -- a server process ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then SIGKILL of the whole group if it does not exit in time; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                raise AssertionError(f"the server ignored SIGTERM for {timeout} s:\n{self.tail()}") from None
        return self.proc.returncode


BODY_TIMEOUT_S = 3.0  # the module server's bound on receiving a body


def start_server(log_dir: Path, *extra: str, timeout: float = 120) -> ServerProcess:
    """``python -m tpserve.server.run`` on a free loopback port, ready when /health answers 200."""
    port = free_port()
    log = log_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "tpserve.server.run", "--model", MODEL, "--port", str(port),
           "--max-seq-len", str(MAX_SEQ_LEN), "--max-batch-size", "16", "--log-level", "warning", *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = ServerProcess(proc, port, log)
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{server.tail()}"
        assert time.monotonic() < deadline, f"the server was not healthy within {timeout} s:\n{server.tail()}"
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("server"), "--body-timeout", str(BODY_TIMEOUT_S))
    yield s
    s.stop()


def sse(lines: list[str]) -> list[dict | str]:
    """The ``data:`` payloads of an event stream, decoded (``[DONE]`` kept as a string)."""
    return [json.loads(d) if d != "[DONE]" else d for ln in lines if ln.startswith("data:") and (d := ln[5:].strip())]


def metric_values(server: ServerProcess) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


# -- stop strings and exactly-once text, unit level with the real tokenizer ---------------------------


def stream_text(tok: Tokenizer, ids: list[int], stops: list[str], step: int = 1) -> list[str]:
    """What the server would send for ``ids`` arriving ``step`` tokens a chunk: the engine's incremental
    detokenizer, then the stop-string filter."""
    detok, stop = IncrementalDetokenizer(tok), StopText(stops)
    sent = []
    for i in range(0, len(ids), step):
        final = i + step >= len(ids)
        sent.append(stop.add(detok.add(ids[i:i + step], final), final))
        if stop.stopped:
            break
    return sent


def test_detokenized_stream_is_exactly_once_for_cjk_emoji_and_byte_tokens(tokenizer):
    ids = tokenizer.encode(MIXED)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert sum("\ufffd" in p for p in pieces) >= 4  # byte tokens that are no character on their own
    for step in (1, 2, 3):
        sent = stream_text(tokenizer, ids, [], step)
        assert "".join(sent) == MIXED
        assert not any("\ufffd" in s for s in sent)  # no character split, none repeated


@pytest.mark.parametrize("stop", ["世界", "🙂", "é", "👍🏽", "のテ", "🇯🇵", "Ωμ", "d", "done."])
def test_stop_string_never_reaches_the_client(tokenizer, stop):
    ids = tokenizer.encode(MIXED)
    expected = MIXED[:MIXED.find(stop)]
    for step in (1, 2, 5):
        sent = stream_text(tokenizer, ids, ["never-there", stop], step)
        assert "".join(sent) == expected
        so_far = ""
        for s in sent:
            so_far += s
            assert expected.startswith(so_far)  # sent text is always a prefix of the cut text


def test_stop_text_holds_back_only_what_could_begin_a_stop():
    st = StopText(["world", "wide"])
    assert st.add("hello w", False) == "hello "  # "w" may begin either stop string
    assert st.add("o", False) == ""  # "wo" may still become "world"
    assert st.add("rk", False) == "work"  # "work" can begin neither: released
    assert st.add(" wid", False) == " "
    assert st.add("th", True) == "width"  # the end releases what was held
    st = StopText(["ab", "b"])
    assert st.add("xa", False) == "x"
    assert st.add("b", False) == ""  # "ab" starts first and wins over "b"
    assert st.stopped and st.add("more", True) == ""
    assert StopText(["abc"]).add("xab", True) == "xab"


def test_stop_text_matches_a_reference_on_random_splits():
    rng = random.Random(7)
    alphabet = "ab世🙂"
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        # Reference: grow the text a character at a time; cut where the first stop string to appear begins.
        ends = [n for n in range(len(text) + 1) if any(s in text[:n] for s in stops)]
        expected = text[:min(text.find(s) for s in stops if s in text[:ends[0]])] if ends else text
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text))))
        parts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        st = StopText(stops)
        got = "".join(st.add(p, i == len(parts) - 1) for i, p in enumerate(parts))
        assert got == expected, (text, stops, parts)


# -- the OpenAI client ---------------------------------------------------------------------------------


def test_models_and_health(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_completions_streaming_and_not(client):
    full = client.completions.create(model=MODEL, prompt="The capital of France is",
                                     max_tokens=12, **GREEDY)
    assert full.choices[0].finish_reason == "length" and full.choices[0].text
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_streaming_and_not(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好! 🙂"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                          **GREEDY)
    assert full.choices[0].message.role == "assistant" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 10 and full.usage.prompt_tokens > 10  # the template's tokens count
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages,
                                                 max_tokens=10, stream=True, stream_options={"include_usage": True},
                                                 **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens
    # OpenAI's newer name for the limit, and content given as parts.
    parts = client.chat.completions.create(
        model=MODEL, max_completion_tokens=10, temperature=0, extra_body={"ignore_eos": True},
        messages=[messages[0], {"role": "user", "content": [{"type": "text", "text": "你好! "},
                                                            {"type": "text", "text": "🙂"}]}])
    assert parts.choices[0].message.content == full.choices[0].message.content


def test_stop_strings_end_to_end(client, tokenizer):
    prompt = tokenizer.encode("你好世界🙂")  # token ids as the prompt: byte-level pieces of CJK and emoji
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, **GREEDY)
    text = full.choices[0].text
    assert len(text) > 12, text
    stop = text[6:11]  # spans several tokens: held back until it is whole
    expected = text[:text.find(stop)]
    for stream in (False, True):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, stop=["never-there", stop], stream=stream,
                                        stream_options={"include_usage": True} if stream else None, **GREEDY)
        if stream:
            chunks = list(out)
            got = "".join(c.choices[0].text for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            used = chunks[-1].usage.completion_tokens
        else:
            got, reason, used = out.choices[0].text, out.choices[0].finish_reason, out.usage.completion_tokens
        assert (got, reason) == (expected, "stop")
        assert used < 40  # the engine request was cut short
    # A stop string absent from the text changes nothing.
    same = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, stop="\x00absent", **GREEDY)
    assert same.choices[0].text == text and same.choices[0].finish_reason == "length"


def test_exactly_once_on_cjk_and_emoji_prompts(client, tokenizer):
    for prompt in ("你好世界🙂", tokenizer.encode("👍🏽 日本語"), MIXED):
        full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=48, **GREEDY)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            prompt=prompt, model=MODEL, max_tokens=48, stream=True, **GREEDY))
        assert streamed == full.choices[0].text


def test_seeded_sampling_is_reproducible(client):
    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16,
                                         temperature=1.0, seed=seed, extra_body={"ignore_eos": True}).choices[0].text

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(99)


def test_several_prompts_and_n(client):
    out = client.completions.create(model=MODEL, prompt=["one", "two"], n=2, max_tokens=5,
                                    **GREEDY)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in out.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]  # greedy: n copies agree
    assert out.usage.completion_tokens == 20
    single = [client.completions.create(model=MODEL, prompt=p, max_tokens=5, **GREEDY)
              for p in ("one", "two")]
    assert out.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in single)


def test_a_shared_prefix_is_reported_as_cached_tokens(server, client):
    """A prompt that shares whole KV blocks (16 tokens each) with an earlier one reads them from the prefix
    cache, and its usage says how many prompt tokens that was: completions, streamed usage and chat."""
    rng = random.Random()  # a prefix no other request of this run has sent
    prefix = [rng.randrange(100, 10_000) for _ in range(40)]  # two whole blocks, and 8 tokens of a third

    def cached(prompt: list[int], **kw) -> int:
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, **GREEDY, **kw)
        usage = out.usage if not kw.get("stream") else list(out)[-1].usage
        assert usage.prompt_tokens == len(prompt)
        return usage.prompt_tokens_details.cached_tokens

    assert cached(prefix + [7]) == 0
    assert cached(prefix + [8, 9]) == 32  # the whole blocks of the shared prefix; the rest is computed
    assert cached(prefix + [10], stream=True, stream_options={"include_usage": True}) == 32
    assert cached([rng.randrange(100, 10_000) for _ in range(40)]) == 0

    system = f"Session {rng.randrange(10**9)}. " + "You answer in one short sentence, politely. " * 4
    answers = [client.chat.completions.create(model=MODEL, max_tokens=2, **GREEDY, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": question}]) for question in ("Hi", "Yo")]
    assert answers[0].usage.prompt_tokens_details.cached_tokens == 0
    assert answers[1].usage.prompt_tokens_details.cached_tokens >= 32

    wait_for(lambda: metric_values(server)[("tpserve_prefix_cache_hit_rate", ())] > 0, 10, "a hit rate")
    # Idle, nothing holds a block: the cached ones are evictable, which counts as free.
    wait_for(lambda: metric_values(server)[("tpserve_kv_cache_usage_perc", ())] == 0, 10, "an empty KV cache")


# -- many streams, disconnects, metrics ---------------------------------------------------------------


async def stream_once(http: httpx.AsyncClient, body: dict) -> tuple[str, list]:
    async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        events = sse([ln async for ln in r.aiter_lines()])
    assert events[-1] == "[DONE]", events[-3:]
    return "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]), events


def test_200_concurrent_streams_each_exactly_once(server, client):
    prompts = ["你好世界🙂", "The quick brown fox", "naïve café 👍🏽", "1 2 3 4", "∑ Ωμέγα", "日本語", "a", "Z z"]
    body = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    expected = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, **GREEDY).choices[0].text
                for p in prompts]

    async def main() -> list[tuple[str, list]]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as http:
            return await asyncio.gather(*(stream_once(http, {**body, "prompt": prompts[i % len(prompts)]})
                                          for i in range(200)))

    results = asyncio.run(asyncio.wait_for(main(), 120))
    assert len(results) == 200
    for i, (text, events) in enumerate(results):
        assert text == expected[i % len(prompts)], i
        finals = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"][0]["finish_reason"]]
        assert finals == ["length"], i


def test_client_disconnect_aborts_the_request(server, client):
    aborted = ("tpserve_requests_total", (("outcome", "abort"),))
    before = metric_values(server)[aborted]
    body = {"prompt": "Go on and on", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            first = next(ln for ln in r.iter_lines() if ln.startswith("data:"))
            assert json.loads(first[5:])["choices"][0]["finish_reason"] is None
        # The client hangs up on the stream: the server notices and aborts the engine request.
        wait_for(lambda: metric_values(server)[aborted] >= before + 1, 10, "the streaming abort")
        # A non-streaming request whose client gives up waiting is aborted too, all its choices.
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={**body, "n": 8}, timeout=httpx.Timeout(30, read=0.1))
        wait_for(lambda: metric_values(server)[aborted] >= before + 9, 10, "the non-streaming abort")
    # The slots came back: a full batch of new requests completes.
    alone = client.completions.create(model=MODEL, prompt="p0", max_tokens=4, **GREEDY)
    batch = client.completions.create(model=MODEL, prompt=[f"p{i}" for i in range(16)],
                                      max_tokens=4, **GREEDY)
    assert [c.finish_reason for c in batch.choices] == ["length"] * 16
    assert batch.choices[0].text == alone.choices[0].text
    wait_for(lambda: metric_values(server)[("tpserve_num_requests_running", ())] == 0, 10, "an idle engine")


def test_metrics_parse_and_move(server, client):
    usage = ("tpserve_kv_cache_usage_perc", ())
    wait_for(lambda: metric_values(server)[usage] == 0.0, 10, "an idle engine")
    before = metric_values(server)
    client.completions.create(model=MODEL, prompt="count me", max_tokens=7, **GREEDY)
    after = metric_values(server)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert delta("tpserve_requests_total", outcome="length") == 1
    assert delta("tpserve_generation_tokens_total") == 7
    assert delta("tpserve_prompt_tokens_total") > 0
    assert delta("tpserve_time_to_first_token_seconds_count") == 1
    assert delta("tpserve_inter_token_latency_seconds_count") == 6
    assert delta("tpserve_e2e_request_latency_seconds_count") == 1
    assert after[("tpserve_e2e_request_latency_seconds_bucket", (("le", "+Inf"),))] >= 1
    for gauge in ("tpserve_num_requests_running", "tpserve_num_requests_waiting", "tpserve_iteration_time_seconds",
                  "tpserve_kv_cache_usage_perc", "tpserve_prefix_cache_hit_rate", "tpserve_num_free_blocks",
                  "tpserve_num_preemptions_total"):
        assert (gauge, ()) in after, gauge
    assert after[("tpserve_iteration_time_seconds", ())] > 0
    # Once the request has ended every block is back (free or cached): a leak would show here.
    wait_for(lambda: metric_values(server)[usage] == 0.0, 10, "the request's blocks freed")
    idle = metric_values(server)
    assert idle[("tpserve_num_free_blocks", ())] == before[("tpserve_num_free_blocks", ())] > 0
    assert idle[("tpserve_num_preemptions_total", ())] == before[("tpserve_num_preemptions_total", ())]  # big pool
    # The same long prompt twice: the second is served from the prefix cache, and the gauge says so.
    prompt = "a prompt long enough to fill several blocks of sixteen tokens each, " * 3
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, **GREEDY)
    wait_for(lambda: metric_values(server)[usage] == 0.0, 10, "an idle engine")
    once = metric_values(server)[("tpserve_prefix_cache_hit_rate", ())]
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, **GREEDY)
    wait_for(lambda: metric_values(server)[("tpserve_prefix_cache_hit_rate", ())] > once, 10, "a prefix-cache hit")
    families = {f.name: f.type for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}
    assert families["tpserve_num_preemptions"] == "counter" and families["tpserve_num_free_blocks"] == "gauge"


# -- what a client should never send -------------------------------------------------------------------

J = "application/json"
BAD_BODIES = [
    # (path, raw body, content type, status, param)
    ("/v1/completions", b'{"prompt": "x", "max_tokens": "5"}', J, 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -1}', J, 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 2.5}', J, 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "temperature": -0.5}', J, 400, "temperature"),
    ("/v1/completions", b'{"prompt": "x", "top_p": 0}', J, 400, "top_p"),
    ("/v1/completions", b'{"prompt": "x", "seed": -3}', J, 400, "seed"),
    ("/v1/completions", b'{"prompt": "x", "stream": "yes"}', J, 400, "stream"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"5": 101}}', J, 400, "logit_bias"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"49157": 1}}', J, 400, "logit_bias"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', J, 400, "max_tokens"),  # 0 only with echo
    ("/v1/completions", b'{"prompt": "x", "best_of": 2}', J, 400, "best_of"),
    ("/v1/completions", b'{"prompt": "x", "stream_options": {"bogus": true}}', J, 400, "stream_options"),
    ("/v1/completions", b'{"prompt": "x", "stop": 7}', J, 400, "stop"),
    ("/v1/completions", json.dumps({"prompt": "x", "stop": ["y" * 513]}).encode(), J, 400, "stop"),
    ("/v1/completions", b'{"prompt": "x", "n": 1000}', J, 400, "n"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 100000}', J, 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": 5}', J, 400, "prompt"),
    ("/v1/completions", b'{"prompt": []}', J, 400, "prompt"),
    ("/v1/completions", b'{"prompt": [1, -2]}', J, 400, "prompt"),
    ("/v1/completions", b'{"prompt": [1, 999999999]}', J, 400, "prompt"),
    ("/v1/completions", json.dumps({"prompt": "word " * 5000}).encode(), J, 400, "prompt"),
    ("/v1/completions", json.dumps({"prompt": list(range(1, 2000))}).encode(), J, 400, "prompt"),
    ("/v1/completions", b'{"prompt": "a\\ud800b"}', J, 400, "prompt"),
    ("/v1/completions", b'{"prompt": "\xff\xfe caf\xe9"}', J, 400, None),
    ("/v1/completions", b'{"prompt": "x", ', J, 400, None),
    ("/v1/completions", b'["prompt", "x"]', J, 400, None),
    ("/v1/completions", b"", J, 400, None),
    ("/v1/completions", b"prompt=x", "application/x-www-form-urlencoded", 400, None),
    ("/v1/completions", b'{"max_tokens": 3}', J, 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "model": "nope"}', J, 404, "model"),
    ("/v1/chat/completions", b'{"messages": []}', J, 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}', J, 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user"}]}', J, 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "tools": []}', J, 400, "tools"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x" * 20000}]}).encode(), J,
     400, "messages"),
    ("/v1/nowhere", b"{}", J, 404, None),
    # Numbers beyond any bound: int64 and past it, and ids outside the vocabulary.
    ("/v1/completions", b'{"prompt": "x", "top_k": 18446744073709551616}', J, 400, "top_k"),
    ("/v1/completions", b'{"prompt": "x", "top_k": 1000000000000000000000000000000}', J, 400, "top_k"),
    ("/v1/completions", b'{"prompt": "x", "top_k": -1}', J, 400, "top_k"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 18446744073709551616}', J, 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -18446744073709551616}', J, 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "stop_token_ids": [18446744073709551616]}', J, 400, "stop_token_ids"),
    ("/v1/completions", b'{"prompt": "x", "stop_token_ids": [9223372036854775807]}', J, 400, "stop_token_ids"),
    ("/v1/completions", b'{"prompt": "x", "stop_token_ids": [-1]}', J, 400, "stop_token_ids"),
    ("/v1/completions", b'{"prompt": "x", "stop_token_ids": null, "seed": 1180591620717411303424}', J, 400, "seed"),
    ("/v1/completions", b'{"prompt": "x", "n": 18446744073709551616}', J, 400, "n"),
    ("/v1/completions", b'{"prompt": [18446744073709551616]}', J, 400, "prompt"),
    ("/v1/completions", b'{"prompt": [[1], [18446744073709551616]]}', J, 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "temperature": 1e400}', J, 400, "temperature"),
    ("/v1/completions", b'{"prompt": "x", "top_p": NaN}', J, 400, "top_p"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", J, 400, None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], '
                             b'"max_completion_tokens": 18446744073709551616}', J, 400, "max_completion_tokens"),
    # What one body may queue is bounded before any prompt is encoded.
    ("/v1/completions", json.dumps({"prompt": ["x"] * 65}).encode(), J, 400, "prompt"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": ""}] * 300}).encode(), J, 400,
     "messages"),
    # Only UTF-8 (a BOM-less UTF-16 body of ASCII is valid UTF-8 bytes, but not JSON in UTF-8).
    ("/v1/completions", '{"prompt": "x", "max_tokens": 2}'.encode("utf-16"), J, 400, None),
    ("/v1/completions", '{"prompt": "x", "max_tokens": 2}'.encode("utf-16-le"), J, 400, None),
    ("/v1/completions", '{"prompt": "x", "max_tokens": 2}'.encode("utf-32"), J, 400, None),
    ("/v1/completions", b'{"prompt": "x", "stream": true, "top_k": 18446744073709551616}', J, 400, "top_k"),
    ("/v1/chat/completions", b'{"messages": null}', J, 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": null}]}', J, 400, "messages"),
]


def test_bad_bodies_answer_4xx_and_the_server_keeps_serving(server, client):
    rejected = ("tpserve_requests_total", (("outcome", "rejected"),))
    before = metric_values(server)[rejected]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for path, body, ctype, status, param in BAD_BODIES:
            r = http.post(path, content=body, headers={"content-type": ctype})
            assert r.status_code == status, (body[:80], r.status_code, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], err
            assert err["type"] == "invalid_request_error", err
            if param is not None:
                assert err["param"] == param, (body[:80], err)
        r = http.post("/v1/completions", json={"prompt": "word " * 1_000_000})  # refused before it is encoded
        assert r.status_code == 400 and "characters" in r.json()["error"]["message"]
        r = http.post("/v1/completions", content=b"x" * (9 << 20), headers={"content-type": J})
        assert r.status_code == 413 and r.json()["error"]["message"]
        assert http.get("/health").status_code == 200
    assert metric_values(server)[rejected] >= before + len(BAD_BODIES) - 1  # all but the unknown route
    out = client.completions.create(model=MODEL, prompt="still here", max_tokens=3, **GREEDY)
    assert out.choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-nope", prompt="x", max_tokens=3)
    assert e.value.code == "model_not_found"


def test_error_bodies_echo_unencodable_text_escaped(server):
    """A lone surrogate cannot be written as UTF-8: an error body that echoes one escapes it instead of
    failing to encode (which was a 500 with no body)."""
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for path, body in (("/v1/completions", b'{"prompt": "x", "model": "a\\ud800b"}'),
                           ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], '
                                                    b'"model": "\\udcff", "stream": true}')):
            r = http.post(path, content=body, headers={"content-type": J})
            assert r.status_code == 404, r.text
            err = json.loads(r.content.decode("utf-8"))["error"]
            assert err["code"] == "model_not_found" and err["param"] == "model"
            assert "\\ud800" in err["message"] or "\\udcff" in err["message"], err


def test_tiny_temperatures_sample_greedily(client):
    """Temperatures below 1e-5 are greedy, as in vLLM: dividing logits by 1e-40 overflows to inf and NaN."""
    body = {"model": MODEL, "prompt": "Tiny temperatures", "max_tokens": 8, "extra_body": {"ignore_eos": True}}
    greedy = client.completions.create(temperature=0, **body).choices[0].text
    for t in (1e-40, 1e-300, 5e-324, 1e-6):
        assert client.completions.create(temperature=t, **body).choices[0].text == greedy, t
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert (client.chat.completions.create(temperature=5e-324, **chat).choices[0].message.content
            == client.chat.completions.create(temperature=0, **chat).choices[0].message.content)


# -- the end of a server -------------------------------------------------------------------------------


def test_a_body_sent_slowly_is_cut_off_and_the_server_serves_on(server, client):
    """A client that sends its body slowly (here: 10 of 1,000 bytes, then nothing) does not hold its
    connection forever: past --body-timeout it gets 408 and the connection ends."""
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\":")
        start = time.monotonic()
        answer = b""
        while chunk := sock.recv(65536):  # until the server closes (bounded by the socket's 30 s timeout)
            answer += chunk
        took = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"body" in answer and took >= BODY_TIMEOUT_S - 0.5, (took, answer[-300:])
    out = client.completions.create(model=MODEL, prompt="still here", max_tokens=3, **GREEDY)
    assert out.choices[0].finish_reason == "length"


def test_a_body_of_more_values_than_any_request_is_refused_before_validation(server):
    """A body can hold millions of values (an 8 MiB list of empty lists): validating them all holds the event
    loop for seconds. More values than any request this server can serve are refused unvalidated (413)."""
    with httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post("/v1/completions", content=b'{"prompt": [' + b",".join([b"[]"] * 1_000_000) + b"]}",
                      headers={"content-type": J})
        assert r.status_code == 413 and "values" in r.json()["error"]["message"], r.text[:300]
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}] * 100_000})
        assert r.status_code == 413 and "values" in r.json()["error"]["message"], r.text[:300]
        assert http.get("/health").status_code == 200


def test_a_request_the_kv_pool_can_never_hold_is_refused_as_too_long(tmp_path):
    """A KV pool smaller than the context: a prompt plus max_tokens beyond the pool could never run (the
    engine ends it with an error, which was a 500), so the server's context is the smaller of the two."""
    small = start_server(tmp_path, "--kv-cache-tokens", "48", "--block-size", "16")
    try:
        with httpx.Client(base_url=small.url, timeout=60) as http:
            assert http.get("/v1/models").json()["data"][0]["max_model_len"] == 48
            r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 100})
            err = r.json()["error"]
            assert r.status_code == 400 and (err["param"], err["code"]) == ("max_tokens", "context_length_exceeded")
            r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 47, "ignore_eos": True})
            assert r.json()["usage"]["completion_tokens"] == 47, r.text
            r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                        "ignore_eos": True})  # the rest of the 48 tokens
            assert r.json()["usage"]["total_tokens"] == 48, r.text
    finally:
        assert small.stop() == 0, small.tail()


def test_dead_engine_answers_503_and_exits_cleanly(tmp_path):
    dying = start_server(tmp_path)
    try:
        workers = [p for p in psutil.Process(dying.proc.pid).children(recursive=True)
                   if "tpserve.worker" in " ".join(p.cmdline())]
        assert workers
        workers[0].kill()
        wait_for(lambda: httpx.get(f"{dying.url}/health", timeout=5).status_code == 503, 30, "health 503")
        assert "dead" in httpx.get(f"{dying.url}/health", timeout=5).json()["error"]["message"]
        r = httpx.post(f"{dying.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
    finally:
        code = dying.stop()
    assert code == 0, dying.tail()


def test_sigterm_ends_streams_with_a_final_event_and_exits_0(server):
    children = psutil.Process(server.proc.pid).children(recursive=True)
    assert children
    body = {"prompt": "Keep talking", "max_tokens": 240, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    got: dict[int, list] = {}
    flowing = [threading.Event() for _ in range(3)]

    def reader(i: int) -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                flowing[i].set()
            got[i] = sse(lines)

    readers = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    for t in readers:
        t.start()
    for f in flowing:
        assert f.wait(30), "no tokens flowing"
    server.proc.send_signal(signal.SIGTERM)
    for t in readers:
        t.join(60)
    assert server.proc.wait(60) == 0, server.tail()
    for events in got.values():
        assert events[-1] == "[DONE]"
        final = [e for e in events[:-1] if e["choices"]][-1]["choices"][0]
        assert final["finish_reason"] == "abort"
        assert events[-2]["usage"]["completion_tokens"] < 240
    assert len(got) == 3
    psutil.wait_procs(children, timeout=30)
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/health", timeout=2)


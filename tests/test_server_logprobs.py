"""The server's log-probabilities, echo, penalties and logit bias, on a live server: the official ``openai``
client reads completions and chat log-probabilities, streamed and not, and their values are Hugging Face's
float32 ``log_softmax``; lm-eval's scoring request (echo + logprobs + max_tokens 0) gives HF's log-likelihood."""

from __future__ import annotations

import httpx
import pytest
import torch
from helpers import _hf_model, built_model
from test_penalties import hf_greedy_with
from test_server import MODEL, sse, start_server

from tpserve import SamplingParams

TOL = 1e-4
PROMPT = [(j * 104729) % 49000 + 5 for j in range(12)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("server"))
    yield s
    s.stop()


def hf_rows(ids: list[int]) -> torch.Tensor:
    """Row p: HF's float32 log-probabilities of the token after position p."""
    with torch.no_grad():
        return torch.log_softmax(_hf_model(MODEL)(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_completions_logprobs_streamed_and_not(client, tokenizer):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    rows = hf_rows(PROMPT + hf_generated(6))
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    generated = hf_generated(6)
    assert "".join(lp.tokens) == out.choices[0].text == tokenizer.decode(generated)
    for i, token in enumerate(generated):
        row = rows[len(PROMPT) - 1 + i]
        assert abs(lp.token_logprobs[i] - row[token].item()) <= TOL
        top = lp.top_logprobs[i]
        assert len(top) == 3  # greedy: the chosen token is the most likely, one of the three
        hf_top = row.topk(3)
        assert sorted(top.values(), reverse=True) == pytest.approx(hf_top.values.tolist(), abs=TOL)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                         stream=True, extra_body={"ignore_eos": True})
    tokens, values, offsets = [], [], []
    for chunk in streamed:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            tokens += chunk.choices[0].logprobs.tokens
            values += chunk.choices[0].logprobs.token_logprobs
            offsets += chunk.choices[0].logprobs.text_offset
    assert tokens == lp.tokens and offsets == lp.text_offset
    assert values == pytest.approx(lp.token_logprobs, abs=TOL)


def hf_generated(n: int) -> list[int]:
    from helpers import hf_greedy

    return hf_greedy(built_model("llama"), PROMPT, n)[:n]


def test_echo_with_max_tokens_0_scores_the_prompt_as_lm_eval_asks(server, tokenizer):
    """lm-eval's loglikelihood request: the context + continuation as token ids, echo, logprobs 1, max_tokens 0;
    it sums token_logprobs over the continuation and checks each continuation token is the top one."""
    body = {"model": MODEL, "prompt": [PROMPT, PROMPT[:7]], "max_tokens": 0, "echo": True, "logprobs": 1,
            "temperature": 0.0, "seed": 1234}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["usage"]["completion_tokens"] == 0
    assert data["usage"]["prompt_tokens"] == len(PROMPT) + 7
    for choice, ids in zip(data["choices"], [PROMPT, PROMPT[:7]], strict=True):
        lp = choice["logprobs"]
        assert choice["text"] == tokenizer.decode(ids) and choice["finish_reason"] == "length"
        assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        rows = hf_rows(ids)
        for j in range(1, len(ids)):
            assert abs(lp["token_logprobs"][j] - rows[j - 1][ids[j]].item()) <= TOL
            best = rows[j - 1].max().item()
            assert max(lp["top_logprobs"][j].values()) == pytest.approx(best, abs=TOL)
        # the sum lm-eval takes for a continuation of the last 4 tokens
        hf_sum = sum(rows[j - 1][ids[j]].item() for j in range(len(ids) - 4, len(ids)))
        assert abs(sum(lp["token_logprobs"][-4:]) - hf_sum) <= 1e-3
    # streamed, the prompt and its log-probabilities come first
    r = httpx.post(f"{server.url}/v1/completions", json=body | {"prompt": PROMPT, "stream": True}, timeout=60)
    events = [e for e in sse(r.text.splitlines()) if e != "[DONE]"]
    text = "".join(c["text"] for e in events for c in e["choices"])
    assert text == tokenizer.decode(PROMPT)
    values = [v for e in events for c in e["choices"] if c["logprobs"] for v in c["logprobs"]["token_logprobs"]]
    assert values == pytest.approx(data["choices"][0]["logprobs"]["token_logprobs"], abs=TOL)


def test_echo_without_logprobs_and_generation(client, tokenizer):
    out = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3, temperature=0, echo=True,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text.startswith("Hello there") and len(out.choices[0].text) > len("Hello there")
    assert out.choices[0].logprobs is None and out.usage.completion_tokens == 3


def test_chat_logprobs_streamed_and_not(client, tokenizer):
    messages = [{"role": "user", "content": "Say something."}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                         top_logprobs=2, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 5 == out.usage.completion_tokens
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    generated = hf_greedy_ids(prompt_ids, 5)
    rows = hf_rows(prompt_ids + generated)
    for i, (item, token) in enumerate(zip(content, generated, strict=True)):
        row = rows[len(prompt_ids) - 1 + i]
        assert item.token == tokenizer.decode([token]) and item.bytes == list(item.token.encode())
        assert abs(item.logprob - row[token].item()) <= TOL
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(row.topk(2).values.tolist(), abs=TOL)
        assert item.top_logprobs[0].token == item.token  # greedy: the chosen one is the most likely
    streamed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                              logprobs=True, top_logprobs=2, stream=True,
                                              extra_body={"ignore_eos": True})
    items = [x for chunk in streamed for c in chunk.choices if c.logprobs for x in c.logprobs.content]
    assert [x.token for x in items] == [x.token for x in content]
    assert [x.logprob for x in items] == pytest.approx([x.logprob for x in content], abs=TOL)
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def hf_greedy_ids(prompt_ids: list[int], n: int) -> list[int]:
    from helpers import hf_greedy

    return hf_greedy(built_model("llama"), prompt_ids, n)[:n]


def test_penalties_and_logit_bias_over_http(client, server, tokenizer):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                    logit_bias={"17": 100}, extra_body={"ignore_eos": True})
    assert out.choices[0].text == tokenizer.decode([17] * 4)
    # two lifted tokens and penalties: greedy decoding over HF's logits with the reference definitions
    messages = [{"role": "user", "content": "x"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                          logit_bias={"17": 100, "18": 99.5}, presence_penalty=2.0,
                                          frequency_penalty=0.5, extra_body={"ignore_eos": True})
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    params = SamplingParams(logit_bias={17: 100.0, 18: 99.5}, presence_penalty=2.0, frequency_penalty=0.5)
    expected = hf_greedy_with(built_model("llama"), prompt_ids, params, 4)
    assert chat.choices[0].message.content == tokenizer.decode(expected)
    assert len(set(expected)) == 2  # the penalties made it switch between the lifted tokens
    ok = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0.5, seed=1,
                                   frequency_penalty=-2.0, extra_body={"repetition_penalty": 1.3, "min_p": 0.1})
    assert ok.usage.completion_tokens == 2
    for change, param in [({"logit_bias": {"999999999": 1}}, "logit_bias"), ({"logit_bias": {"x": 1}}, "logit_bias"),
                          ({"logit_bias": {"1": 101}}, "logit_bias"), ({"presence_penalty": 2.5}, "presence_penalty"),
                          ({"max_tokens": 0}, "max_tokens"), ({"logprobs": 21}, "logprobs"),
                          ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_p": 1.5}, "min_p")]:
        r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x", **change}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (change, r.text)
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL, "top_logprobs": 2,
                                                             "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_lm_eval_request_shape_gives_hf_log_likelihoods(server, tokenizer):
    """The body lm-eval 0.4's local-completions model sends for a loglikelihood request (token ids of context +
    continuation, echo, logprobs 1, max_tokens 1, seed 1234), parsed as its parse_logprobs does (the sum of
    token_logprobs[ctxlen:-1], greedy when every token is its top's best), on the documents of the lm-eval
    task in tests/lm_eval_task: equal to HF's log-likelihood within 1e-3."""
    import json
    from pathlib import Path

    docs = [json.loads(line) for line in
            (Path(__file__).parent / "lm_eval_task" / "tpserve_loglikelihood.jsonl").read_text().splitlines()]
    for doc in docs:
        ctx, cont = tokenizer.encode(doc["context"]), tokenizer.encode(doc["continuation"])
        body = {"model": MODEL, "prompt": [ctx + cont], "temperature": 0, "max_tokens": 1, "logprobs": 1,
                "seed": 1234, "echo": True}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        token_logprobs = choice["logprobs"]["token_logprobs"][len(ctx) : -1]
        tops = choice["logprobs"]["top_logprobs"][len(ctx) : -1]
        assert len(token_logprobs) == len(cont)
        rows = hf_rows(ctx + cont)
        hf = [rows[len(ctx) + i - 1] for i in range(len(cont))]
        assert abs(sum(token_logprobs) - sum(row[t].item() for row, t in zip(hf, cont, strict=True))) <= 1e-3
        greedy = all(v == max(top.values()) for v, top in zip(token_logprobs, tops, strict=True))
        assert greedy == all(row.argmax().item() == t for row, t in zip(hf, cont, strict=True))

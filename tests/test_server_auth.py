"""API keys: a missing key, a wrong key, a key of another length or in the wrong header is a 401 with OpenAI's
error body and reaches nothing behind the check; the right key works; /health and /metrics stay open
unless every route is protected; the keys show in no log, metric or worker environment."""

from __future__ import annotations

import os

import httpx
import openai
import psutil
import pytest
from starlette.testclient import TestClient
from test_server import MODEL, metric_values, start_server

from tpserve.server.auth import APIKeyAuth, keys_from

KEYS = ["sk-test-0123456789abcdef", "second-key"]


class Behind:
    """An ASGI app that counts the requests that reach it."""

    def __init__(self) -> None:
        self.reached = 0

    async def __call__(self, scope, receive, send) -> None:
        self.reached += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


BAD_HEADERS = [
    {},  # no key
    {"Authorization": "Bearer wrong-key-0123456789abc"},  # wrong, same length as the first key
    {"Authorization": "Bearer sk-test"},  # a prefix of a key: another length
    {"Authorization": "Bearer " + KEYS[0] + "x"},
    {"Authorization": "Bearer"},
    {"Authorization": KEYS[0]},  # no scheme
    {"Authorization": "Basic " + KEYS[0]},
    {"Authorization": "Bearer" + KEYS[0]},
    {"X-API-Key": KEYS[0]},  # the wrong header
    {"api-key": KEYS[0]},
    {"Proxy-Authorization": "Bearer " + KEYS[0]},
]


@pytest.mark.parametrize("all_routes", [False, True])
def test_refused_requests_never_reach_the_app(all_routes):
    behind = Behind()
    refused = []
    app = APIKeyAuth(behind, KEYS, all_routes=all_routes, on_refused=lambda: refused.append(1))
    client = TestClient(app)  # no lifespan: the app behind is bare ASGI
    for headers in BAD_HEADERS:
        for path in ("/v1/completions", "/v1/models", "/v1/anything"):
            r = client.post(path, headers=headers, json={"prompt": "x"})
            assert r.status_code == 401, (headers, path)
            assert r.json()["error"]["code"] == "invalid_api_key" and r.json()["error"]["message"]
            assert KEYS[0] not in r.text
    two = [("authorization", f"Bearer {KEYS[0]}"), ("authorization", "Bearer nope")]
    assert client.get("/v1/models", headers=two).status_code == 401  # two headers: ambiguous, refused
    assert behind.reached == 0 and len(refused) == 3 * len(BAD_HEADERS) + 1
    for key in KEYS:
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert client.get("/v1/models", headers={"authorization": f"bearer {key}"}).status_code == 200
    assert behind.reached == 4
    for path in ("/health", "/metrics"):
        assert client.get(path).status_code == (401 if all_routes else 200)
        assert client.get(path, headers={"Authorization": f"Bearer {KEYS[1]}"}).status_code == 200


def test_keys_from_the_command_line_or_the_environment():
    assert keys_from(["a", "b"], {"TPSERVE_API_KEY": "c"}) == ["a", "b"]
    assert keys_from(None, {"TPSERVE_API_KEY": "c, d,"}) == ["c", "d"]
    assert keys_from(None, {}) == []
    with pytest.raises(ValueError):
        APIKeyAuth(Behind(), [])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    os.environ["TPSERVE_API_KEY"] = ",".join(KEYS)  # the environment, as the docs recommend
    try:
        s = start_server(tmp_path_factory.mktemp("auth"))
    finally:
        del os.environ["TPSERVE_API_KEY"]
    yield s
    s.stop()


def engine_counts(server) -> tuple[float, float]:
    """Choices the server handled (every outcome, rejected included) and prompt tokens admitted."""
    m = metric_values(server)
    choices = sum(v for (name, _), v in m.items() if name == "tpserve_requests_total")
    return choices, m[("tpserve_prompt_tokens_total", ())]


def test_live_server_refuses_without_the_key_and_serves_with_it(server):
    before = engine_counts(server)
    refused_before = metric_values(server)[("tpserve_unauthorized_requests_total", ())]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for headers in BAD_HEADERS:
            for path, body in (("/v1/completions", {"prompt": "x", "max_tokens": 2}),
                               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
                r = http.post(path, headers=headers, json=body)
                assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error", r.text
            assert http.get("/v1/models", headers=headers).status_code == 401
        assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200
    assert engine_counts(server) == before  # nothing refused reached the server's handlers or the engine
    refused = metric_values(server)[("tpserve_unauthorized_requests_total", ())] - refused_before
    assert refused == 3 * len(BAD_HEADERS)
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-it", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=MODEL, prompt="x", max_tokens=2)
    for key in KEYS:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60) as good:
            out = good.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0)
            assert out.usage.completion_tokens == 2
    assert engine_counts(server)[0] == before[0] + 2
    # the keys appear nowhere: not in the log, not in the metrics, not in the workers' environment
    log = server.log.read_text(errors="replace")
    assert "2 API key(s) required on /v1/*" in log
    text = log + httpx.get(f"{server.url}/metrics").text
    assert not any(k in text for k in KEYS)
    workers = [p for p in psutil.Process(server.proc.pid).children(recursive=True)]
    assert workers
    for p in workers:
        try:
            env = p.environ()
        except psutil.Error:
            continue
        assert not any(k in " ".join(env.values()) for k in KEYS), p.cmdline()


def test_serve_flags(monkeypatch):
    import argparse

    from tpserve.server.run import add_serve_args, main

    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args(["--api-key", "a", "--api-key", "b", "--api-key-all-routes"])
    assert args.api_key == ["a", "b"] and args.api_key_all_routes
    assert p.parse_args(["--api-key", "a", "b", "--port", "1"]).api_key == ["a", "b"]
    monkeypatch.delenv("TPSERVE_API_KEY", raising=False)
    assert main(["--api-key-all-routes"]) == 2  # protecting every route with no key would lock everyone out
    assert main(["--api-key", ""]) == 2  # "--api-key $UNSET" must not start a server open to all

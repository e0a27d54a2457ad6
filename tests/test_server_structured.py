"""Structured output through the HTTP API on a random-weight model: OpenAI's ``response_format`` (the official
client's ``parse`` with a pydantic model, and json_object), vLLM's ``structured_outputs`` and ``guided_*``
fields on chat and completions; invalid constraints and oversized fields are 400s naming the field."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from test_server import MODEL, start_server

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "c": {"enum": ["x", "y"]}},
          "required": ["n", "c"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("server"))
    yield s
    s.stop()


class Pet(BaseModel):
    kind: Literal["cat", "dog", "bird"]
    age: int = Field(ge=0, le=30)
    vaccinated: bool


def test_openai_parse_gives_a_parsed_object(client):
    messages = [{"role": "user", "content": "Describe a pet."}]
    parse = client.chat.completions.parse if hasattr(client.chat.completions, "parse") else \
        client.beta.chat.completions.parse
    for seed in range(3):
        out = parse(model=MODEL, messages=messages, response_format=Pet, max_tokens=60, temperature=1.0, seed=seed)
        pet = out.choices[0].message.parsed
        assert isinstance(pet, Pet) and out.choices[0].finish_reason == "stop", out


def test_json_object_and_every_vllm_field(client):
    chat = [{"role": "user", "content": "JSON please"}]
    out = client.chat.completions.create(model=MODEL, messages=chat, max_tokens=40, temperature=0,
                                         response_format={"type": "json_schema",
                                                          "json_schema": {"name": "s", "schema": SCHEMA}})
    jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
    out = client.chat.completions.create(model=MODEL, messages=chat, max_tokens=30, temperature=0,
                                         response_format={"type": "json_object"})
    text = out.choices[0].message.content
    assert text.startswith("{") and (out.choices[0].finish_reason != "stop" or isinstance(json.loads(text), dict))
    cases = [({"guided_json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
             ({"guided_regex": "[a-c]{2}-[0-9]{3}"}, lambda t: re.fullmatch("[a-c]{2}-[0-9]{3}", t)),
             ({"guided_choice": ["alpha", "beta"]}, lambda t: t in ("alpha", "beta")),
             ({"guided_grammar": 'start: "go" ("!" | "?")'}, lambda t: t in ("go!", "go?")),
             ({"structured_outputs": {"json": SCHEMA}}, lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
             ({"structured_outputs": {"regex": "z+"}}, lambda t: re.fullmatch("z+", t)),
             ({"structured_outputs": {"choice": ["one", "two"]}}, lambda t: t in ("one", "two")),
             ({"structured_outputs": {"grammar": 'start: "a" "b"'}}, lambda t: t == "ab")]
    for extra, check in cases:
        for stream in (False, True):
            if stream:
                text = "".join(c.choices[0].text for c in client.completions.create(
                    model=MODEL, prompt="Say:", max_tokens=40, temperature=1.0, seed=1, extra_body=extra,
                    stream=True) if c.choices)
            else:
                text = client.chat.completions.create(model=MODEL, messages=chat, max_tokens=40, temperature=0,
                                                      extra_body=extra).choices[0].message.content
            assert check(text) is not False, (extra, text)


@pytest.mark.parametrize("body, field, why", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "strin"}}}},
     "response_format", "Invalid type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s"}}}, "response_format", "schema"),
    ({"response_format": {"type": "xml"}}, "response_format", ""),
    ({"guided_regex": "a(b"}, "guided_regex", "unclosed group"),
    ({"guided_regex": "a" * 5000}, "guided_regex", ""),
    ({"guided_choice": []}, "guided_choice", ""),
    ({"guided_choice": ["x"] * 257}, "guided_choice", ""),
    ({"guided_grammar": "start: foo"}, "guided_grammar", "unknown name"),
    ({"guided_json": "{"}, "guided_json", "not JSON"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"jsn": {}}}, "structured_outputs", ""),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "not guided_regex and guided_choice"),
])
def test_invalid_constraints_are_400s_naming_the_field(server, body, field, why):
    for path, base in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions",
                                                             {"messages": [{"role": "user", "content": "x"}]})):
        r = httpx.post(f"{server.url}{path}", json={**base, "max_tokens": 4, **body}, timeout=30)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == field and why in err["message"], err
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_an_oversized_schema_is_refused(client):
    big = {"type": "object", "description": "x" * 70000}
    with pytest.raises(openai.BadRequestError, match="at most 65536"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       extra_body={"guided_json": big})

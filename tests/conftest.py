"""Fixtures shared by the server test modules: each module starts its own ``server`` (its own options); these
talk to whichever one the module defines."""

from __future__ import annotations

import pytest
from helpers import built_model

from tpserve.proxy.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def client(server):
    """The official OpenAI client against the module's server."""
    import openai

    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", timeout=60, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(built_model("llama"))

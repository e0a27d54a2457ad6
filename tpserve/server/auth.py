"""API keys: every ``/v1/*`` request (every route with ``all_routes``) must carry ``Authorization: Bearer KEY``
with one of the server's keys, or it is answered 401 here, before routing: a refused request reaches nothing
behind this middleware (no body is read, no tokenizer, no engine). ``/health`` and ``/metrics`` stay open by
default, vLLM's rule.

Keys are compared as SHA-256 digests with ``hmac.compare_digest``, against every key without stopping
early, so neither a key's content nor its length shows in the time of an answer. The keys live only here:
never in a log line, a trace or a metric (a refusal is counted, without what was sent)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Callable, Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

ENV_VAR = "TPSERVE_API_KEY"  # one key, or several separated by commas
UNAUTHORIZED = json.dumps({"error": {
    "message": "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'.",
    "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}).encode()


def keys_from(cli_keys: Sequence[str] | None, environ: dict[str, str] | None = None) -> list[str]:
    """The keys of ``--api-key`` (repeatable), else of ``TPSERVE_API_KEY``; empty entries are dropped."""
    environ = os.environ if environ is None else environ
    keys = list(cli_keys or []) or environ.get(ENV_VAR, "").split(",")
    return [k.strip() for k in keys if k.strip()]


class APIKeyAuth:
    """Pure ASGI, outermost: HTTP requests to protected paths need a valid bearer key."""

    def __init__(self, app: ASGIApp, keys: Sequence[str], all_routes: bool = False,
                 on_refused: Callable[[], None] | None = None) -> None:
        if not keys:
            raise ValueError("APIKeyAuth needs at least one key")
        self.app = app
        self.digests = [hashlib.sha256(k.encode()).digest() for k in keys]
        self.all_routes = all_routes
        self.on_refused = on_refused

    def protects(self, path: str) -> bool:
        return self.all_routes or path == "/v1" or path.startswith("/v1/")

    def authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        values = [v for k, v in headers if k.lower() == b"authorization"]
        if len(values) != 1:
            return False
        scheme, _, token = values[0].strip().partition(b" ")
        if scheme.lower() != b"bearer":
            token = b""  # still compared below, so a malformed header costs the same time as a wrong key
        digest = hashlib.sha256(token.strip()).digest()
        ok = False
        for d in self.digests:
            ok |= hmac.compare_digest(digest, d)
        return ok and scheme.lower() == b"bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.protects(scope.get("path", "")) or self.authorized(scope["headers"]):
            await self.app(scope, receive, send)
            return
        if self.on_refused is not None:
            self.on_refused()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(UNAUTHORIZED)).encode()),
            (b"www-authenticate", b'Bearer realm="tpserve"')]})
        await send({"type": "http.response.body", "body": UNAUTHORIZED})

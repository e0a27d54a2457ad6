"""HTTP plumbing under the OpenAI API: bodies read as UTF-8 JSON only, bounds on a body's size and on the
time it takes to arrive while it is read, a bound on the values it may hold before it is validated, and
server-sent event streams that close their generator however the response ends."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def sse(event: BaseModel) -> bytes:
    """One server-sent event carrying ``event`` as JSON."""
    return b"data: " + event.model_dump_json().encode() + b"\n\n"


class EventStream(StreamingResponse):
    """A streaming response that closes its generator however the response ends, so a client that
    disconnects aborts its engine requests at once instead of whenever the generator is collected."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


class UTF8Request(Request):
    """A request whose JSON body must be UTF-8 (a UTF-8 BOM is allowed). Starlette hands the raw bytes to
    ``json.loads``, which guesses UTF-16 or UTF-32 from the first bytes and accepts them."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                text = body.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise HTTPException(400, f"the body is not UTF-8 (byte {e.start})") from None
            try:
                self._json = json.loads(text)
            except json.JSONDecodeError:
                raise  # FastAPI reports where
            except (ValueError, RecursionError) as e:  # an integer of over 4,300 digits, nesting too deep
                raise HTTPException(400, f"the body cannot be read as JSON: {e}") from None
            limit = getattr(self.app.state, "max_json_values", None)
            if limit is not None and count_values(self._json, limit) > limit:
                raise HTTPException(413, f"the body holds more than {limit} values: more than any request this "
                                         "server can serve")
        return self._json


def count_values(obj: Any, limit: int) -> int:
    """The values in a decoded JSON body (every list item and object member, nested ones included), counted
    up to just past ``limit``: the work is bounded by the limit, not by the body."""
    seen, todo = 0, [obj]
    while todo:
        v = todo.pop()
        if not isinstance(v, (list, dict)):
            continue
        seen += len(v)
        if seen > limit:
            return seen
        todo.extend(v if isinstance(v, list) else v.values())
    return seen


class UTF8Route(APIRoute):
    """A route that reads its body as a ``UTF8Request``."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handle = super().get_route_handler()

        async def utf8(request: Request) -> Response:
            return await handle(UTF8Request(request.scope, request.receive))

        return utf8


class BodyLimit:
    """Refuses a body over ``limit`` bytes with 413 while it is read, so no client can make the server hold
    an arbitrarily large body in memory, and a body that has not arrived ``timeout`` seconds after the
    request began with 408, so no client holds a connection by sending its body slowly (the errors go
    through the app's handlers, as OpenAI bodies)."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float = 30.0) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        seen = 0
        complete = False
        deadline = time.monotonic() + self.timeout

        async def limited() -> Message:
            nonlocal seen, complete
            if complete:  # after the body: a wait for the client's disconnect, unbounded
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.timeout:g} s") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.limit:
                    raise HTTPException(413, f"the request body exceeds {self.limit} bytes")
            return message

        await self.app(scope, limited if scope["type"] == "http" else receive, send)

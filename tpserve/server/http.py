"""HTTP plumbing under the OpenAI API: bodies read as UTF-8 JSON only, a bound on a body's size while it is
read, and server-sent event streams that close their generator however the response ends."""

from __future__ import annotations

import json
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
        return self._json


class UTF8Route(APIRoute):
    """A route that reads its body as a ``UTF8Request``."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handle = super().get_route_handler()

        async def utf8(request: Request) -> Response:
            return await handle(UTF8Request(request.scope, request.receive))

        return utf8


class BodyLimit:
    """Refuses a body over ``limit`` bytes with 413 while it is read, so no client can make the server hold
    an arbitrarily large body in memory (the error goes through the app's handlers, as an OpenAI body)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, f"the request body exceeds {self.limit} bytes")
            return message

        await self.app(scope, limited if scope["type"] == "http" else receive, send)

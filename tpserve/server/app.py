"""The OpenAI-compatible HTTP app over one ``LLM``: its routes, and the errors of every kind (the server's
own refusals, bodies that fail validation, HTTP errors, bugs) as OpenAI error bodies. What a generation
request does is ``OpenAIServer``'s (tpserve/server/serving.py)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from tpserve.proxy.llm import LLM
from tpserve.server.auth import APIKeyAuth
from tpserve.server.http import BodyLimit, UTF8Route
from tpserve.server.protocol import (
    MAX_CHOICES,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from tpserve.server.serving import OpenAIServer

MAX_BODY_BYTES = 8 << 20
BODY_TIMEOUT_S = 30.0  # the most a request's body may take to arrive
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body().model_dump(), status_code=e.status)


def create_app(llm: LLM, model_name: str | None = None, api_keys: list[str] | None = None,
               api_key_all_routes: bool = False, body_timeout: float = BODY_TIMEOUT_S) -> FastAPI:
    """The FastAPI app serving ``llm``; ``app.state.server`` is its ``OpenAIServer``. With ``api_keys``, every
    ``/v1/*`` route (every route with ``api_key_all_routes``) needs ``Authorization: Bearer`` one of them."""
    server = OpenAIServer(llm, model_name)
    app = FastAPI(title="tpserve", docs_url=None, redoc_url=None)
    app.router.route_class = UTF8Route
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES, timeout=body_timeout)
    if api_keys:  # added last: the outermost layer, before the body is read or a route is found
        app.add_middleware(APIKeyAuth, keys=api_keys, all_routes=api_key_all_routes,
                           on_refused=server.metrics.unauthorized.inc)
    app.state.server = server
    # No servable request holds more values than MAX_CHOICES prompts of max_seq_len token ids, or
    # max_seq_len messages of a few fields each: a body with more is refused before it is validated, which
    # would hold the event loop for seconds (a million empty lists: 3 s of validation errors).
    app.state.max_json_values = (MAX_CHOICES + 8) * server.max_seq_len + 10_000

    def rejected(request: Request, e: APIError) -> JSONResponse:
        if request.url.path in GENERATION_PATHS and e.status < 500:
            server.metrics.requests.labels("rejected").inc()
        return _error(e)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return rejected(request, e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = list(e.errors())
        loc = [str(x) for x in errors[0].get("loc", ()) if x != "body"] if errors else []
        param = loc[0] if loc and not loc[0].isdigit() else None
        parts = []
        for err in errors[:3]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            msg = "unknown field" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid")
            if err.get("type") == "json_invalid":
                msg = f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')} at character {where}"
                where = ""
            parts.append(f"{where}: {msg}" if where and not where.isdigit() else msg)
        return rejected(request, APIError(400, "; ".join(parts) or "invalid request body", param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        detail = e.detail if isinstance(e.detail, str) else str(e.detail)
        if e.status_code == 400:  # FastAPI could not read the body: not JSON in UTF-8
            detail = f"{detail}: send a JSON object in UTF-8"
        return rejected(request, APIError(e.status_code, detail))

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception) -> JSONResponse:
        """A bug, never a client's doing: an OpenAI body all the same (Starlette logs the traceback)."""
        return _error(APIError(500, f"internal error: {type(e).__name__}: {e}"))

    @app.get("/health")
    async def health() -> Response:
        why = server.unavailable()
        return Response(status_code=200) if why is None else _error(APIError(503, why, code="engine_unavailable"))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=server.model_name, max_model_len=server.max_seq_len)])

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> Any:
        return await server.completions(req, request)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatCompletionRequest, request: Request) -> Any:
        return await server.chat(req, request)

    return app

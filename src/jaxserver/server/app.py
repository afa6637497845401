"""The FastAPI app over a `Backend`: the seed's /instruct, /chat and /status routes (`seed_routes`), the
OpenAI-compatible routes (`openai_api`), vLLM's tokenizer routes (`tokenizer_api`), /health and /metrics.

Routes stay thin: they build the prompt through the backend, check the request before any token is
generated, and map errors to one JSON body. Every route reaches the engine through one `EngineClient`
(streaming.py), which aborts what a client leaves.
All middleware is plain ASGI: Starlette's BaseHTTPMiddleware would hide client disconnects from the
handlers.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from jaxserver.config import JAXServerConfig
from jaxserver.errors import JAXServerError
from jaxserver.server.auth import ApiKeyAuth
from jaxserver.server.backend import Backend
from jaxserver.server.limits import RequestBodyLimits
from jaxserver.server.metrics import Metrics, RequestCounter
from jaxserver.server.openai_api import openai_router
from jaxserver.server.request_ids import RequestIds, UnexpectedErrors, server_error_message
from jaxserver.server.responses import ERROR_RESPONSES, error_body, error_response, validation_response
from jaxserver.server.seed_routes import seed_router
from jaxserver.server.streaming import EngineClient
from jaxserver.server.tokenizer_api import tokenizer_router

# The seed routes keep FastAPI's 422 for an invalid field, which their clients know; OpenAI's and vLLM's
# routes answer 400, as those servers do.
SEED_PATHS = frozenset({"/instruct", "/chat"})


def create_app(backend: Backend) -> FastAPI:
    """The whole HTTP API (and, when the config asks, the web pages) over `backend`."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # The HTTP server has drained (or given up on) its requests: end whatever is left.
        await run_in_threadpool(backend.shutdown, 0.0)

    app = FastAPI(
        title="jaxserver",
        description="Serve large language models from JAX.",
        version="0.1.0",
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
    )
    metrics = Metrics(backend.engine_stats)
    client = EngineClient(backend, metrics)
    add_middleware(app, backend.config, metrics)
    add_error_handlers(app)
    app.include_router(seed_router(backend, client))
    app.include_router(service_router(backend, metrics))
    app.include_router(openai_router(backend, client))
    app.include_router(tokenizer_router(backend))
    if backend.config.ui:
        from jaxserver.server import ui  # Gradio takes seconds to import: only when asked

        ui.mount_ui(app, backend, client)
    return app


def add_middleware(app: FastAPI, config: JAXServerConfig, metrics: Metrics) -> None:
    """Outermost first: request ids, CORS (when origins are configured), request counting, the API key
    (when set), the body limits, the 500 of an unexpected error. add_middleware wraps what is there: the last added is the outermost."""
    app.add_middleware(UnexpectedErrors)
    app.add_middleware(RequestBodyLimits, max_bytes=config.max_body_bytes, timeout_s=config.body_timeout_s)
    if config.api_key is not None:
        browser_pages: tuple[str, ...] = ()
        if config.ui:
            from jaxserver.server.ui import PAGE_PATHS  # Gradio takes seconds to import: only when asked

            browser_pages = PAGE_PATHS
        app.add_middleware(ApiKeyAuth, api_key=config.api_key.get_secret_value(), browser_pages=browser_pages)
    app.add_middleware(RequestCounter, metrics=metrics)
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(RequestIds)


def add_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, as the one JSON error body."""

    @app.exception_handler(JAXServerError)
    async def _known_error(http: Request, exc: JAXServerError) -> JSONResponse:
        if exc.status_code >= 500 and exc.status_code != 503:  # our failure: the log has its cause
            exc.message = server_error_message(exc.message, http)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(http: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(exc, 422 if http.url.path in SEED_PATHS else 400)

    @app.exception_handler(HTTPException)
    async def _http_error(http: Request, exc: HTTPException) -> JSONResponse:
        message = f"{http.method} {http.url.path}: {exc.detail}"
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(message, kind), exc.status_code, headers=exc.headers)


def service_router(backend: Backend, metrics: Metrics) -> APIRouter:
    """/health and /metrics, for load balancers and Prometheus."""
    router = APIRouter(tags=["service"])

    @router.get("/health")
    def health() -> JSONResponse:
        """200 once the model is loaded and compiled and the engine runs; else 503 with the reason. Needs
        no API key."""
        try:
            backend.require_ready()
        except JAXServerError as exc:  # not ready, or the engine died: the reason, always as 503
            return JSONResponse(error_body(exc.message, "service_unavailable") | {"status": "down"}, 503)
        return JSONResponse({"status": "ok"})

    @router.get("/metrics", response_class=PlainTextResponse)
    def prometheus_metrics() -> Response:
        """Prometheus metrics: requests by route and status, tokens, latency histograms, engine load."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return router

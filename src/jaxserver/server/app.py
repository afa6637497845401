"""The FastAPI app: the seed's /instruct, /chat and /status routes over a `JAXServer`, the OpenAI-compatible
routes (`openai_api`), vLLM's tokenizer routes (`tokenizer_api`), /health and /metrics.

Routes stay thin: they build the prompt through the server (so overrides of `forward_instruct` /
`forward_chat` apply), check it before any token is generated, and map errors to one JSON body. Every
route reaches the engine through one `EngineClient` (streaming.py), which aborts what a client leaves.
Middleware, outermost first: CORS (when origins are configured), request counting, the API key (when
set), the body size limit. All of it is plain ASGI: Starlette's BaseHTTPMiddleware would hide client
disconnects from the handlers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from jaxserver.engine.request import OutputStream
from jaxserver.errors import EngineError, JAXServerError
from jaxserver.server.auth import ApiKeyAuth
from jaxserver.server.metrics import Metrics, RequestCounter
from jaxserver.server.openai_api import openai_router
from jaxserver.server.responses import (
    ERROR_RESPONSES,
    STREAMED,
    error_body,
    error_response,
    sse,
    validation_response,
)
from jaxserver.server.schemas import ChatRequest, GenerationResponse, InstructRequest
from jaxserver.server.streaming import ClientDisconnected, EngineClient
from jaxserver.server.tokenizer_api import tokenizer_router

if TYPE_CHECKING:
    from jaxserver.jaxserver import JAXServer

log = logging.getLogger(__name__)

# The seed routes keep FastAPI's 422 for an invalid field, which their clients know; OpenAI's and vLLM's
# routes answer 400, as those servers do.
SEED_PATHS = frozenset({"/instruct", "/chat"})


class BodySizeLimit:
    """413 for a declared body over `max_bytes`. Plain ASGI on purpose: Starlette's BaseHTTPMiddleware
    wraps `receive` so that handlers no longer see the client disconnect."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_bytes:
                message = f"the request body has {int(length)} bytes; the limit is {self.max_bytes}"
                response = JSONResponse(error_body(message, "invalid_request_error"), status_code=413)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(server: JAXServer) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # The HTTP server has drained (or given up on) its requests: end whatever is left.
        await run_in_threadpool(server.shutdown, 0.0)

    app = FastAPI(
        title="jaxserver",
        description="Serve large language models from JAX.",
        version="0.1.0",
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
    )

    config = server.config
    metrics = Metrics(lambda: server.engine.stats() if server.engine is not None else None)
    client = EngineClient(server, metrics)
    # add_middleware wraps what is there: the last added is the outermost.
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    if config.ui:
        from jaxserver.server import ui  # Gradio takes seconds to import: only when asked
    if config.api_key is not None:
        browser_pages = ui.PAGE_PATHS if config.ui else ()
        app.add_middleware(ApiKeyAuth, api_key=config.api_key.get_secret_value(), browser_pages=browser_pages)
    app.add_middleware(RequestCounter, metrics=metrics)
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"], allow_headers=["*"]
        )

    @app.exception_handler(JAXServerError)
    async def _known_error(_: Request, exc: JAXServerError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(http: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(exc, 422 if http.url.path in SEED_PATHS else 400)

    @app.exception_handler(HTTPException)
    async def _http_error(http: Request, exc: HTTPException) -> JSONResponse:
        message = f"{http.method} {http.url.path}: {exc.detail}"
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(message, kind), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), 500)

    def overridden(name: str) -> bool:
        """True when a JAXServer subclass replaced the seed's forward function `name`."""
        from jaxserver.jaxserver import JAXServer

        return getattr(type(server), name) is not getattr(JAXServer, name)

    async def generate(http: Request, data: InstructRequest | ChatRequest, string: str) -> Any:
        request = server.prepare(
            string,
            data.greedy,
            data.max_new_tokens,
            temperature=data.temperature,
            top_p=data.top_p,
            top_k=data.top_k,
            seed=data.seed,
            ignore_eos=data.ignore_eos,
            timeout_s=data.timeout,
        )
        streams = client.submit([request])
        if data.stream:
            return client.event_stream(stream_events(streams), streams)
        response, used = "", 0
        try:
            async with contextlib.aclosing(client.chunks(streams, http)) as chunks:
                async for _, chunk in chunks:
                    if chunk.finish_reason == "error":
                        raise EngineError(chunk.error or "the engine failed")
                    response, used = response + chunk.text, chunk.tokens_generated
        except ClientDisconnected:
            return Response(status_code=499)  # client closed the request; nobody reads this
        server.count_request()
        return {"input": string, "response": response, "tokens_used": used}

    async def stream_events(streams: Sequence[OutputStream]) -> AsyncIterator[str]:
        response, finished = "", False
        async with contextlib.aclosing(client.chunks(streams)) as chunks:
            async for _, chunk in chunks:
                if chunk.finish_reason == "error":
                    yield sse(error_body(chunk.error or "the engine failed", "server_error"))
                    break
                response += chunk.text
                finished = chunk.finish_reason is not None
                yield sse(
                    {
                        "delta": chunk.text,
                        "response": response,
                        "tokens_used": chunk.tokens_generated,
                        "finish_reason": chunk.finish_reason,
                    }
                )
        if finished:
            server.count_request()
        yield sse("[DONE]")

    @app.post("/instruct", response_model=GenerationResponse, responses=STREAMED)
    async def instruct(data: InstructRequest, http: Request) -> Any:
        """Answer one instruction, formatted with the model's chat template or the seed's instruct_format."""
        server.require_ready()
        if overridden("forward_instruct") and not data.stream:
            return await run_in_threadpool(server.forward_instruct, data)
        return await generate(http, data, server.build_instruct_prompt(data.prompt, data.system))

    @app.post("/chat", response_model=GenerationResponse, responses=STREAMED)
    async def chat(data: ChatRequest, http: Request) -> Any:
        """Answer the next turn of a conversation given its history."""
        server.require_ready()
        if overridden("forward_chat") and not data.stream:
            return await run_in_threadpool(server.forward_chat, data)
        return await generate(
            http, data, server.build_chat_prompt(data.prompt, data.history or [], data.system)
        )

    @app.get("/status")
    def status() -> dict[str, Any]:
        """Model, devices, uptime, counters and the configuration."""
        return server.status()

    @app.get("/health")
    def health() -> JSONResponse:
        """200 once the model is loaded and compiled and the engine runs; else 503 with the reason. Needs
        no API key."""
        try:
            server.require_ready()
        except JAXServerError as exc:  # not ready, or the engine died: the reason, always as 503
            return JSONResponse(error_body(exc.message, "service_unavailable") | {"status": "down"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus_metrics() -> Response:
        """Prometheus metrics: requests by route and status, tokens, latency histograms, engine load."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    app.include_router(openai_router(server, client))
    app.include_router(tokenizer_router(server))

    if config.ui:
        ui.mount_ui(app, server)
    return app

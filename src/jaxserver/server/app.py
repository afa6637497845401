"""The FastAPI app: the seed's /instruct, /chat and /status routes over a `JAXServer`.

Routes stay thin: they build the prompt through the server (so overrides of `forward_instruct` /
`forward_chat` apply), check it before any token is generated, and map errors to one JSON body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from jaxserver.engine.request import OutputStream
from jaxserver.errors import EngineError, JAXServerError, NotReadyError, OverloadedError
from jaxserver.server.schemas import ChatRequest, GenerationResponse, InstructRequest

if TYPE_CHECKING:
    from jaxserver.jaxserver import JAXServer

log = logging.getLogger(__name__)

# How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_S = 0.25


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(exc: JAXServerError) -> JSONResponse:
    body = error_body(exc.message, exc.error_type, exc.param, exc.code)
    headers = {}
    if isinstance(exc, NotReadyError):
        body["status"] = "down"  # the seed's answer while the model is not up
    if isinstance(exc, OverloadedError):
        headers["Retry-After"] = str(exc.retry_after_s)
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


def validation_response(exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return JSONResponse(
            error_body(f"the body is not valid JSON: {first.get('msg')}", "invalid_request_error"), 400
        )
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = f"{param or 'body'}: {first.get('msg')}"
    return JSONResponse(error_body(message, "invalid_request_error", param), status_code=422)


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


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
    )

    app.add_middleware(BodySizeLimit, max_bytes=server.config.max_body_bytes)

    @app.exception_handler(JAXServerError)
    async def _known_error(_: Request, exc: JAXServerError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(exc)

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
        )
        chunks = server.submit(request, asyncio.get_running_loop())
        if data.stream:
            return StreamingResponse(stream_events(chunks), media_type="text/event-stream")
        response, used = "", 0
        checked_at = time.monotonic()
        try:
            while True:
                chunk = await chunks.next(timeout_s=DISCONNECT_POLL_S)
                if time.monotonic() - checked_at >= DISCONNECT_POLL_S:
                    checked_at = time.monotonic()
                    if await http.is_disconnected():
                        server.abort(request.request_id)
                        return Response(status_code=499)  # client closed the request; nobody reads this
                if chunk is None:
                    continue
                if chunk.finish_reason == "error":
                    raise EngineError(chunk.error or "the engine failed")
                response, used = response + chunk.text, chunk.tokens_generated
                if chunk.finish_reason:
                    break
        except asyncio.CancelledError:
            server.abort(request.request_id)
            raise
        server.count_request()
        return {"input": string, "response": response, "tokens_used": used}

    async def stream_events(chunks: OutputStream) -> AsyncIterator[str]:
        response, finished = "", False
        try:
            async for chunk in chunks:
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
        finally:
            if not finished:  # the client went away (or the engine failed): free the slot
                server.abort(chunks.request.request_id)
        if finished:
            server.count_request()
        yield sse("[DONE]")

    @app.post("/instruct", response_model=GenerationResponse)
    async def instruct(data: InstructRequest, http: Request) -> Any:
        """Answer one instruction, formatted with the model's chat template or the seed's instruct_format."""
        server.require_ready()
        if overridden("forward_instruct") and not data.stream:
            return await run_in_threadpool(server.forward_instruct, data)
        return await generate(http, data, server.build_instruct_prompt(data.prompt, data.system))

    @app.post("/chat", response_model=GenerationResponse)
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

    return app

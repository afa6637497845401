"""The FastAPI app: the seed's /instruct, /chat and /status routes over a `JAXServer`.

Routes stay thin: they build the prompt through the server (so overrides of `forward_instruct` /
`forward_chat` apply), check it before any token is generated, and map errors to one JSON body.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from jaxserver.errors import JAXServerError, NotReadyError
from jaxserver.server.schemas import ChatRequest, GenerationResponse, InstructRequest

if TYPE_CHECKING:
    from jaxserver.jaxserver import JAXServer

log = logging.getLogger(__name__)


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(exc: JAXServerError) -> JSONResponse:
    body = error_body(exc.message, exc.error_type, exc.param, exc.code)
    if isinstance(exc, NotReadyError):
        body["status"] = "down"  # the seed's answer while the model is not up
    return JSONResponse(body, status_code=exc.status_code)


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


def create_app(server: JAXServer) -> FastAPI:
    app = FastAPI(title="jaxserver", description="Serve large language models from JAX.", version="0.1.0")

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

    def stream_events(string: str, data: InstructRequest | ChatRequest) -> StreamingResponse:
        request = server.prepare(
            string,
            data.greedy,
            data.max_new_tokens,
            temperature=data.temperature,
            top_p=data.top_p,
            top_k=data.top_k,
            seed=data.seed,
        )

        def events() -> Iterator[str]:
            response = ""
            try:
                for chunk in server.stream(request):
                    response += chunk.text
                    yield sse(
                        {
                            "delta": chunk.text,
                            "response": response,
                            "tokens_used": chunk.tokens_generated,
                            "finish_reason": chunk.finish_reason,
                        }
                    )
                server.count_request()
            except JAXServerError as exc:
                yield sse(error_body(exc.message, exc.error_type, exc.param, exc.code))
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    def require_ready() -> None:
        if not server.ready:
            raise NotReadyError(server.load_error or "the model is still loading")

    @app.post("/instruct", response_model=GenerationResponse)
    def instruct(data: InstructRequest) -> Any:
        """Answer one instruction, formatted with the model's chat template or the seed's instruct_format."""
        require_ready()
        if data.stream:
            return stream_events(server.build_instruct_prompt(data.prompt, data.system), data)
        return server.forward_instruct(data)

    @app.post("/chat", response_model=GenerationResponse)
    def chat(data: ChatRequest) -> Any:
        """Answer the next turn of a conversation given its history."""
        require_ready()
        if data.stream:
            return stream_events(server.build_chat_prompt(data.prompt, data.history or [], data.system), data)
        return server.forward_chat(data)

    @app.get("/status")
    def status() -> dict[str, Any]:
        """Model, devices, uptime, counters and the configuration."""
        return server.status()

    return app

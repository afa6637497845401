"""The one JSON error body every route answers with, and server-sent events."""

from __future__ import annotations

import json
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from jaxserver.errors import AuthenticationError, JAXServerError, NotReadyError, OverloadedError
from jaxserver.server.schemas import ErrorResponse

# The error answers every route may give, as the OpenAPI schema documents them (FastAPI's `responses`).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "An invalid or unsupported field, malformed JSON, or a prompt over the context."),
        (401, "A missing or wrong API key."),
        (404, "An unknown model or route."),
        (413, "A body over max_body_bytes."),
        (422, "An invalid field (the seed's routes)."),
        (500, "The engine failed."),
        (503, "Overloaded (with Retry-After), loading, or shutting down."),
    )
}
# A generation route's 200 when the body asks for "stream": server-sent events.
STREAMED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": 'The answer; with "stream": true, server-sent events ending with "data: [DONE]".',
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {"data": {"type": "string", "description": "a JSON chunk, or [DONE] last"}},
                    "required": ["data"],
                }
            }
        },
    }
}


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
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


def validation_response(exc: RequestValidationError, status_code: int) -> JSONResponse:
    """Malformed JSON is 400; a wrong field is `status_code` with `param` naming the field."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return JSONResponse(
            error_body(f"the body is not valid JSON: {first.get('msg')}", "invalid_request_error"), 400
        )
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    reason = "this field is not supported" if first.get("type") == "extra_forbidden" else first.get("msg")
    message = f"{param or 'body'}: {reason}"
    return JSONResponse(error_body(message, "invalid_request_error", param), status_code=status_code)


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"

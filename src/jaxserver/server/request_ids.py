"""An id for every HTTP request, answered in the `X-Request-Id` header and written beside any failure in
the log, so that a client's report of a 500 leads to its traceback without the body carrying it."""

from __future__ import annotations

import re
import uuid

from fastapi import Request

HEADER = b"x-request-id"
# A client's own id is kept when it is a short token (it reaches the log and the answer's headers).
_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


class RequestIds:
    """Plain ASGI (as every middleware here): sets `request.state.request_id` and the answer's header."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(HEADER, b"")
        rid = given.decode() if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (HEADER, rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


def request_id(http: Request) -> str:
    return getattr(http.state, "request_id", "-")


def server_error_message(message: str, http: Request) -> str:
    """What a client reads of a failure on our side: a stable message and where the log has the rest."""
    return f"{message} (request id {request_id(http)})"

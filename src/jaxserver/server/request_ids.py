"""An id for every HTTP request, answered in the `X-Request-Id` header and written beside any failure in
the log, so that a client's report of a 500 leads to its traceback without the body carrying it; and the
500 of an unexpected error."""

from __future__ import annotations

import logging
import re
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse

from jaxserver.server.asgi import HttpMiddleware
from jaxserver.server.responses import error_body

log = logging.getLogger("jaxserver.server")

HEADER = b"x-request-id"
# A client's own id is kept when it is a short token (it reaches the log and the answer's headers).
_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


class RequestIds(HttpMiddleware):
    """Sets `request.state.request_id` and the answer's header."""

    async def handle(self, scope, receive, send) -> None:
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


class UnexpectedErrors(HttpMiddleware):
    """An exception no handler took: logged with the request id, answered 500 with a stable message.
    Inside the other middleware, not Starlette's outermost layer: that one re-raises after answering, and
    uvicorn then closes the connection under a client that meant to reuse it."""

    async def handle(self, scope, receive, send) -> None:
        started = False

        async def noting_start(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, noting_start)
        except Exception:
            if started:  # too late for a status: uvicorn ends the response
                raise
            http = Request(scope)
            log.exception("request %s failed", request_id(http))
            message = server_error_message("internal error; the server log has the details", http)
            await JSONResponse(error_body(message, "server_error"), 500)(scope, receive, send)

"""Bounds on what one client can hold: the size and sending time of a request body, the time to send the
request line and headers, and the number of open connections (docs/reliability.md)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import uvicorn
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from jaxserver.config import JAXServerConfig
from jaxserver.server.asgi import HttpMiddleware
from jaxserver.server.responses import error_body


class RequestBodyLimits(HttpMiddleware):
    """Reads a request's body whole before the app sees it: 413 once it passes `max_bytes`, counted as
    the bytes arrive (a chunked body declares no length), and 408 when it takes longer than `timeout_s`."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        super().__init__(app)
        self.max_bytes, self.timeout_s = max_bytes, timeout_s

    async def handle(self, scope, receive, send) -> None:
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(int(length), scope, send)
            return
        body, deadline = bytearray(), time.monotonic() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                message = f"the request body did not arrive within {self.timeout_s:g} s"
                await _closing(JSONResponse(error_body(message, "invalid_request_error"), 408), scope, send)
                return
            if message["type"] == "http.disconnect":
                return  # nobody to answer
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._too_large(len(body), scope, send, at_least=True)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replaying(bytes(body), receive), send)

    async def _too_large(self, size: int, scope, send, at_least: bool = False) -> None:
        count = f"at least {size}" if at_least else str(size)
        message = f"the request body has {count} bytes; the limit is {self.max_bytes} (max_body_bytes)"
        await _closing(JSONResponse(error_body(message, "invalid_request_error"), 413), scope, send)


async def _closing(response: JSONResponse, scope, send) -> None:
    """Answer and close the connection: the rest of the body is not read."""
    response.headers["Connection"] = "close"

    async def nothing_more() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    await response(scope, nothing_more, send)


def _replaying(body: bytes, receive):
    """A `receive` that gives the body read ahead once, then whatever the client sends next (its
    disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> dict[str, Any]:
        return pending.pop() if pending else await receive()

    return replay


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with two bounds it lacks. A connection whose request line and headers have
    not all arrived within `header_timeout_s` of their first byte (or of its opening) is closed: a client
    sending a byte at a time would hold it forever. A connection past `max_connections` open gets 503
    with the JSON error body and is closed (uvicorn's own `limit_concurrency` answers in plain text)."""

    class GuardedProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self.app = _too_many_connections(max_connections)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self._arm_header_timer()  # the bytes of a new request
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._cancel_header_timer()  # its headers are in: the app has the request

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.logger.info(
                    "closing a connection whose request headers took over %g s", header_timeout_s
                )
                self.transport.close()

    return GuardedProtocol


def _too_many_connections(limit: int):
    """The app of a connection over the limit: 503 and close."""

    async def refuse(scope, receive, send) -> None:
        message = f"the server has {limit} connections open (max_connections); retry shortly"
        body = error_body(message, "overloaded", code="overloaded")
        await _closing(JSONResponse(body, 503, {"Retry-After": "1"}), scope, send)

    return refuse


def uvicorn_config(app: Any, config: JAXServerConfig, **options: Any) -> uvicorn.Config:
    """uvicorn's settings for serving `app` at config.host:config.port with the limits of `config`;
    `options` add to them or replace them."""
    settings = {
        "host": config.host,
        "port": config.port,
        "http": guarded_protocol(config.header_timeout_s, config.max_connections),
    }
    return uvicorn.Config(app, **(settings | options))

"""The base of every middleware here: plain ASGI over HTTP requests, because Starlette's
BaseHTTPMiddleware wraps `receive` so that handlers no longer see a client's disconnect."""

from __future__ import annotations


class HttpMiddleware:
    """Passes every scope but "http" (lifespan, websockets) straight on; `handle` takes HTTP requests."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            await self.handle(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def handle(self, scope, receive, send) -> None:
        raise NotImplementedError

"""The API key check: with a key configured, every route but /health needs `Authorization: Bearer <key>`."""

from __future__ import annotations

import hmac

from jaxserver.errors import AuthenticationError
from jaxserver.server.responses import error_response

OPEN_PATHS = frozenset({"/health"})


class ApiKeyAuth:
    """401 before routing, so that a request without the key never reaches a handler (nothing is
    generated). Plain ASGI, like every middleware here. The key is compared in constant time and never
    logged or echoed."""

    def __init__(self, app, api_key: str):
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, key = given.partition(b" ")
            # compare_digest takes as long for any wrong key of a given length as for the right one
            if not (hmac.compare_digest(key.strip(), self.api_key) and scheme.lower() == b"bearer"):
                reason = "a wrong API key" if given else "no API key"
                error = AuthenticationError(
                    f"the request has {reason}; send the header `Authorization: Bearer <key>`",
                    code="invalid_api_key",
                )
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)

"""The API key check: with a key configured, every route but /health needs `Authorization: Bearer <key>`.

A browser cannot send that header, so the Gradio pages are left to Gradio's own login form instead
(`browser_login`), and the landing page, which only links to them, is open."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from jaxserver.errors import AuthenticationError
from jaxserver.server.asgi import HttpMiddleware
from jaxserver.server.responses import error_response

OPEN_PATHS = frozenset({"/health"})


def same_key(given: str | bytes, api_key: str | bytes) -> bool:
    """compare_digest takes as long for any wrong key of a given length as for the right one."""
    as_bytes = lambda key: key.encode() if isinstance(key, str) else key
    return hmac.compare_digest(as_bytes(given), as_bytes(api_key))


def browser_login(api_key: str) -> Callable[[str, str], bool]:
    """Gradio's login check for the UI pages: any user name, the API key as the password."""
    return lambda _user, password: same_key(password, api_key)


class ApiKeyAuth(HttpMiddleware):
    """401 before routing, so that a request without the key never reaches a handler (nothing is
    generated). The key is compared in constant time and never logged or echoed."""

    def __init__(self, app, api_key: str, browser_pages: tuple[str, ...] = ()):
        """`browser_pages`: path prefixes of pages that check the key themselves (the Gradio apps); with
        any, the landing page at "/" is open too."""
        super().__init__(app)
        self.api_key = api_key.encode()
        self.open_paths = OPEN_PATHS | {"/"} if browser_pages else OPEN_PATHS
        self.open_prefixes = tuple(prefix.rstrip("/") + "/" for prefix in browser_pages)

    def is_open(self, path: str) -> bool:
        return path in self.open_paths or (path + "/").startswith(self.open_prefixes)

    async def handle(self, scope, receive, send) -> None:
        if not self.is_open(scope["path"]):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, key = given.partition(b" ")
            if not (same_key(key.strip(), self.api_key) and scheme.lower() == b"bearer"):
                reason = "a wrong API key" if given else "no API key"
                error = AuthenticationError(
                    f"the request has {reason}; send the header `Authorization: Bearer <key>`",
                    code="invalid_api_key",
                )
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)

"""TGI's API key: only the inference routes, `Authorization` equal to `Bearer <key>` compared
case-insensitively on the whole string; anything else is a bare 401."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

# TGI's "base routes" (POST). `/v1/*` are listed for the OpenAI routes.
PROTECTED = frozenset(
    {
        "/",
        "/generate",
        "/generate_stream",
        "/v1/chat/completions",
        "/v1/completions",
        "/vertex",
        "/invocations",
        "/tokenize",
    }
)


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"bearer {api_key}".lower().encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in PROTECTED:
            if not self._authorized(scope):
                await send({"type": "http.response.start", "status": 401, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        return key_matches(scope.get("headers", []), self.expected)


def key_matches(headers: list[tuple[bytes, bytes]], expected: bytes) -> bool:
    """The first `authorization` header, lower-cased, equals `expected` (constant time)."""
    for name, value in headers:
        if name == b"authorization":
            return hmac.compare_digest(value.decode("latin-1").lower().encode(), expected)
    return False

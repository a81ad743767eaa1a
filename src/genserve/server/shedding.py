"""Load shedding: when every concurrency permit is taken, a request to a route whose overload
answer is an HTTP 429 gets it at once, before its body is read, parsed and validated.

In a burst, over-cap requests then cost the event loop a fraction of a normal request, so
they are refused quickly and the loop stays free for the streams it is serving. The answer is
the one the route would give anyway (`429 Model is overloaded` + `Retry-After`). Routes that
report overload inside an SSE stream (TGI's `/generate_stream`, and `/` or `/invocations`,
which may stream) are left to their handlers.

Two places give it:
- `FastShed`, called by the HTTP protocol (`limits.TimedHttpToolsProtocol`) as soon as a
  request head is parsed: no ASGI scope, task or middleware at all. It answers only when the
  ASGI stack would have answered exactly the same: not draining (503 first), the API key
  right (401 first), no `Origin` header (CORS headers come from the ASGI stack), URL and
  headers within the limits (414/431 first). A burst of 872 over-cap requests while 128
  streams generate: p50 26-44 ms, max 44-57 ms, against 60-72 / 81-96 ms through the ASGI
  middleware alone (`bench/overload.py`).
- `ShedMiddleware`, the innermost ASGI middleware, for everything else (the h11 protocol,
  browsers' CORS requests, pipelined requests).
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from genserve.server.auth import key_matches
from genserve.server.errors import OverloadedError
from genserve.server.generation import RESERVATION, GenerationService, Reservation
from genserve.server.limits import MAX_HEADER_BYTES, RESERVATION_KEY

# routes whose overload answer is always an HTTP 429 (streams included, for the OpenAI ones)
SHED_ROUTES = frozenset({"/generate", "/vertex", "/v1/chat/completions", "/v1/completions"})
SHED_RAW_PATHS = frozenset(p.encode() for p in SHED_ROUTES)


def _overloaded(service: GenerationService) -> bytes:
    """Counts the refusal as the route would and returns the JSON body."""
    service.metrics.request_count.inc()
    err = service.fail(OverloadedError())
    return b'{"error":"%s","error_type":"%s"}' % (err.message.encode(), err.error_type.encode())


class ShedMiddleware:
    def __init__(self, app: ASGIApp, service: GenerationService, retry_after: str) -> None:
        self.app = app
        self.service = service
        self.retry_after = retry_after.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        reservation = scope.get(RESERVATION_KEY) if scope["type"] == "http" else None
        if reservation is not None:  # admitted at arrival: the handler's acquire decides
            token = RESERVATION.set(reservation)
            try:
                await self.app(scope, receive, send)
            finally:
                RESERVATION.reset(token)
                reservation.release()
            return
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] in SHED_ROUTES
            and self.service.permits.full
        ):
            body = _overloaded(self.service)
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
                (b"retry-after", self.retry_after),
            ]
            await send({"type": "http.response.start", "status": 429, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


class FastShed:
    """`__call__(method, url, headers)` -> the whole HTTP 429 response to write; or, for a
    shed route with permits free, a `Reservation` that the protocol puts in the request's
    scope and releases when the response is complete (or the connection lost) if the handler
    has not turned it into permits first; or None: not ours, through to the ASGI app."""

    def __init__(
        self, service: GenerationService, lifecycle: Any, api_key: str | None, retry_after: str
    ) -> None:
        self.service = service
        self.lifecycle = lifecycle
        self.expected = None if not api_key else f"bearer {api_key}".lower().encode()
        self.retry_after = retry_after.encode()

    def __call__(
        self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]]
    ) -> bytes | Reservation | None:
        if method != b"POST" or url not in SHED_RAW_PATHS:
            return None  # (a query string or %-escapes: not an exact match, the ASGI path)
        permits = self.service.permits
        if not permits.full:
            return Reservation(permits)
        if self.lifecycle.draining:
            return None
        size = 0
        for name, value in headers:  # names are lower-cased by the protocol
            if name == b"origin":
                return None
            size += len(name) + len(value) + 4
        if size > MAX_HEADER_BYTES:
            return None
        if self.expected is not None and not key_matches(headers, self.expected):
            return None
        body = _overloaded(self.service)
        return (
            b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nretry-after: %s\r\n\r\n%s" % (len(body), self.retry_after, body)
        )

"""Load shedding: when every concurrency permit is taken, a request to a route whose overload
answer is an HTTP 429 gets it at once, before its body is read, parsed and validated.

In a burst, over-cap requests then cost the event loop a fraction of a normal request, so
they are refused quickly and the loop stays free for the streams it is serving. The answer is
the one the route would give anyway (`429 Model is overloaded` + `Retry-After`). Routes that
report overload inside an SSE stream (TGI's `/generate_stream`, and `/` or `/invocations`,
which may stream) are left to their handlers. Runs after the API key check.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from genserve.server.errors import OverloadedError
from genserve.server.generation import GenerationService

# routes whose overload answer is always an HTTP 429 (streams included, for the OpenAI ones)
SHED_ROUTES = frozenset({"/generate", "/vertex", "/v1/chat/completions", "/v1/completions"})


class ShedMiddleware:
    def __init__(self, app: ASGIApp, service: GenerationService, retry_after: str) -> None:
        self.app = app
        self.service = service
        self.retry_after = retry_after.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        permits = self.service.permits
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] in SHED_ROUTES
            and permits.in_use >= permits.limit
        ):
            self.service.metrics.request_count.inc()
            err = self.service.fail(OverloadedError())
            body = b'{"error":"%s","error_type":"%s"}' % (
                err.message.encode(),
                err.error_type.encode(),
            )
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
                (b"retry-after", self.retry_after),
            ]
            await send({"type": "http.response.start", "status": 429, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

"""Server-Sent Events exactly as TGI (axum 0.7) writes them, and client-disconnect handling.

Framing: `data:` immediately followed by compact JSON, then `\\n\\n`; keep-alive is the comment
`:\\n\\n` every 15 s; no `event:` names and no `[DONE]` on TGI's native routes. Each event is
sent as its own ASGI message, so uvicorn writes it to the socket at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

KEEP_ALIVE_INTERVAL_S = 15.0
KEEP_ALIVE = b":\n\n"

T = TypeVar("T")


def sse_data(payload: Any) -> bytes:
    """One `data:{json}\\n\\n` event; compact JSON with non-ASCII kept, as serde_json writes it."""
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return b"data:" + text.encode() + b"\n\n"


class SSEResponse(StreamingResponse):
    """A streaming response that always listens for the client going away and then cancels the
    body iterator at once (whatever ASGI spec version the server reports), so the generator's
    `finally` aborts the engine request."""

    def __init__(self, content: AsyncIterator[bytes], headers: dict[str, str] | None = None):
        hdrs = {"Cache-Control": "no-cache", **(headers or {})}
        super().__init__(content, media_type="text/event-stream", headers=hdrs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:

            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:
                    pass  # the socket went away mid-write
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()
        body = self.body_iterator
        if hasattr(body, "aclose"):
            await body.aclose()


async def with_keepalive(
    source: AsyncIterator[T], interval: float = KEEP_ALIVE_INTERVAL_S
) -> AsyncIterator[T | None]:
    """Items of `source`, with `None` whenever `interval` passes without one.

    The pending `__anext__` survives a timeout (it is never cancelled by one), so a slow engine
    step is not mistaken for a client abort.
    """
    it = source.__aiter__()
    pending: asyncio.Future[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            task, pending = pending, None
            try:
                item = task.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        close = getattr(source, "aclose", None)
        if close is not None:
            with contextlib.suppress(RuntimeError):
                await close()


class ClientDisconnected(Exception):
    pass


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work` (a non-streaming generation) but cancel it as soon as the client disconnects,
    which aborts its engine request. The body must already have been read."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientDisconnected()


def disconnected_response() -> Response:
    """Nobody reads it; nginx's 499 says what happened in access logs."""
    return Response(status_code=499)

"""Hard limits on what a client may send, answered with a clear 4xx before any route runs.

- URL longer than `MAX_URL_BYTES` -> 414; request head (all header lines) larger than
  `MAX_HEADER_BYTES` -> 431. Heads too large for the HTTP parser itself also get 431.
- A request head that does not arrive within the read timeout (slowloris) -> 408 and the
  connection is closed; so does a body that is not complete within it (408 JSON error).
- Idle keep-alive connections are closed by uvicorn's `timeout_keep_alive`.

The body size limit (413) is `--payload-limit`, applied where the body is read (`body.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools missing: the pure-Python h11 protocol
    HttpToolsProtocol = None

from genserve.server.errors import RequestBodyError

logger = logging.getLogger(__name__)

MAX_URL_BYTES = 8 * 1024
# the scope key under which the httptools protocol hands a request's load-shedding
# reservation (`shedding.FastShed`) to the ASGI app
RESERVATION_KEY = "genserve.reservation"
MAX_HEADER_BYTES = 16 * 1024
# what the HTTP parser buffers for one request head before it gives up (then: 431)
MAX_HEAD_BYTES = 64 * 1024
DEFAULT_READ_TIMEOUT_S = 30.0

REASONS = {408: "Request Timeout", 414: "URI Too Long", 431: "Request Header Fields Too Large"}


def error_json(message: str, error_type: str = "validation") -> bytes:
    return json.dumps({"error": message, "error_type": error_type}).encode()


async def send_error(send: Send, status: int, message: str, error_type: str = "validation") -> None:
    body = error_json(message, error_type)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestLimitsMiddleware:
    """414 / 431 on oversized URLs and heads; 408 when the body is not in by the deadline."""

    def __init__(self, app: ASGIApp, read_timeout: float = DEFAULT_READ_TIMEOUT_S) -> None:
        self.app = app
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        url = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        if url > MAX_URL_BYTES:
            await send_error(send, 414, f"URI Too Long: at most {MAX_URL_BYTES} bytes")
            return
        head = sum(len(k) + len(v) + 4 for k, v in scope.get("headers", []))
        if head > MAX_HEADER_BYTES:
            message = f"Request Header Fields Too Large: at most {MAX_HEADER_BYTES} bytes"
            await send_error(send, 431, message)
            return
        await self.app(scope, _deadline_receive(receive, self.read_timeout), send)


def _deadline_receive(receive: Receive, timeout: float) -> Receive:
    """`receive` that raises a 408 if the body is not complete `timeout` s after the request
    started. Once the body is in, it waits freely (that is the disconnect watch)."""
    deadline = asyncio.get_running_loop().time() + timeout
    body_done = False

    async def wrapped() -> Message:
        nonlocal body_done
        if body_done:
            return await receive()
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(max(remaining, 0.0)):
                message = await receive()
        except TimeoutError:
            raise RequestBodyError(408, "Request body not received in time") from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            body_done = True
        return message

    return wrapped


class _HeadDeadline:
    """A deadline for each request head, shared by both HTTP protocols below: uvicorn has none,
    so a client that sends half a head would hold its connection forever. The protocol calls
    `_arm()` when a connection opens or a response completes and `_disarm()` once a whole head
    is in. Each protocol defines `_partial_head()`: whether some bytes of a head have arrived
    (then the timeout is answered with a 408; an idle connection is just closed)."""

    read_timeout: float = DEFAULT_READ_TIMEOUT_S
    _head_timer: asyncio.TimerHandle | None = None
    _partial_head: Callable[[], bool]

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.read_timeout, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._partial_head():  # tell the client why
            self._reply_and_close(408, "Request head not received in time")
        else:  # nothing at all (an idle connection): just close it
            self.transport.close()

    def _reply_and_close(self, status: int, message: str) -> None:
        body = error_json(message)
        head = (
            f"HTTP/1.1 {status} {REASONS[status]}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        logger.info("closing a connection: %s", message)
        self.transport.write(head.encode() + body)
        self.transport.close()


class TimedH11Protocol(_HeadDeadline, H11Protocol):
    """uvicorn's pure-Python h11 protocol (the fallback when httptools is not installed) with
    the head deadline and 431, not a bare 400, for heads over the parser's limit."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before:  # a whole head arrived: the route's own limits apply now
            self._disarm()

    def on_response_complete(self) -> None:
        before = self.cycle
        self._arm()  # the next head has the same deadline (keep-alive idle is uvicorn's)
        super().on_response_complete()
        if self.cycle is not before:
            self._disarm()

    def send_400_response(self, msg: str) -> None:
        if len(self.conn.trailing_data[0]) > MAX_HEAD_BYTES:
            self._reply_and_close(431, f"Request head larger than {MAX_HEAD_BYTES} bytes")
        else:
            super().send_400_response(msg)

    def _partial_head(self) -> bool:
        return bool(self.conn.trailing_data[0])


if HttpToolsProtocol is not None:

    class TimedHttpToolsProtocol(_HeadDeadline, HttpToolsProtocol):
        """uvicorn's httptools (llhttp, in C) protocol with the head deadline and a
        `MAX_HEAD_BYTES` bound on each head (431); parsing in C keeps the event loop's cost
        per request low, which is what answers a burst of over-cap requests quickly."""

        _in_head = False
        _head_bytes = 0  # bytes received while the current head is incomplete
        _shedding = False  # the current request was answered by `_shed_now`
        _reservation: Any = None  # the current request's shedding.Reservation

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            # `shedding.FastShed`, set by the app as `app.state.fast_shed` (None: no app of ours)
            self._fast_shed = getattr(getattr(self.config.app, "state", None), "fast_shed", None)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            self._release_reservation()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_bytes = True, 0

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_head and not self.transport.is_closing():  # a head still incomplete
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_BYTES:
                    self._reply_and_close(431, f"Request head larger than {MAX_HEAD_BYTES} bytes")

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._disarm()  # a whole head arrived: the route's own limits apply now
            if self._shed_now():
                return
            super().on_headers_complete()

        def _shed_now(self) -> bool:
            """An over-cap request answered here (`shedding.FastShed`) with no ASGI cycle: its
            body is then read and dropped. One let through may carry a reservation, released
            when its response is complete."""
            shed = self._fast_shed
            if shed is None or not (self.cycle is None or self.cycle.response_complete):
                return False  # (a pipelined request must wait for the one before it)
            method = self.parser.get_method()
            reply = shed(method, self.url, self.headers)
            if reply is None:
                return False
            if not isinstance(reply, bytes):
                self._release_reservation()
                self._reservation = self.scope[RESERVATION_KEY] = reply
                return False
            self._shedding = True
            self.transport.write(reply)
            if self.access_log:
                client = "{}:{}".format(*self.client) if self.client else "-"
                self.access_logger.info('%s - "%s %s HTTP/1.1" 429', client, method.decode(),
                                        self.url.decode("latin-1"))  # fmt: skip
            if not self.parser.should_keep_alive():
                self.transport.close()
            return True

        def _release_reservation(self) -> None:
            if self._reservation is not None:
                self._reservation.release()
                self._reservation = None

        def on_body(self, body: bytes) -> None:
            if not self._shedding:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._shedding:
                super().on_message_complete()
                return
            self._shedding = False
            self.on_response_complete()  # keep-alive as after any response

        def on_response_complete(self) -> None:
            self._release_reservation()
            super().on_response_complete()
            if self.cycle is None or self.cycle.response_complete:  # nothing pipelined
                self._arm()

        def _partial_head(self) -> bool:
            return self._in_head


def protocol_class(read_timeout: float, parser: str = "auto") -> type[_HeadDeadline]:
    """`parser` "auto": the httptools protocol when httptools is installed (a dependency),
    else h11; "h11" forces the fallback."""
    use_h11 = parser == "h11" or HttpToolsProtocol is None
    base = TimedH11Protocol if use_h11 else TimedHttpToolsProtocol
    return type(base.__name__, (base,), {"read_timeout": read_timeout})

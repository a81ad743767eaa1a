"""Readiness, liveness and graceful termination (see docs/operations.md).

- Liveness (`GET /live`): the process serves HTTP and the engine thread has not crashed.
  Draining is still live: a pod must not be killed for finishing its work.
- Readiness (`GET /ready`, and TGI's `GET /health`): the engine runs and the server is not
  draining.
- SIGTERM / SIGINT start a drain: new inference requests (every POST) get 503 with
  `Connection: close`, probes report not ready, requests in flight run on for up to
  `--graceful-termination-timeout` seconds; those still running then are ended with an explicit
  error (an SSE error event on streams, a 424 otherwise) and the process exits 0. A second
  SIGINT (Ctrl+C) exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from genserve.server.limits import DEFAULT_READ_TIMEOUT_S, MAX_HEAD_BYTES, protocol_class

logger = logging.getLogger(__name__)

SHUTDOWN_MESSAGE = "the server is shutting down"
FLUSH_TIMEOUT_S = 5.0  # after ending the last requests: time for their error events to go out
POLL_S = 0.05


class Lifecycle:
    """The state probes read and the drain that SIGTERM starts."""

    def __init__(self, engine: Any, graceful_timeout: float = 90.0) -> None:
        self.engine = engine
        self.graceful_timeout = graceful_timeout
        self.draining = False
        self.inflight = 0  # POST requests inside the app
        self.on_drained: Callable[[], None] | None = None  # the server's "exit now"
        self._task: asyncio.Task[None] | None = None

    @property
    def live(self) -> bool:
        return bool(getattr(self.engine, "healthy", True)) or self.draining

    @property
    def ready(self) -> bool:
        return bool(getattr(self.engine, "healthy", True)) and not self.draining

    def begin_drain(self) -> None:
        """Idempotent; call on the event loop."""
        if self.draining:
            return
        self.draining = True
        self._task = asyncio.get_running_loop().create_task(self.drain())

    async def drain(self) -> None:
        logger.info(
            "draining: %d requests in flight, up to %gs", self.inflight, self.graceful_timeout
        )
        if not await self._wait_idle(self.graceful_timeout):
            logger.warning("graceful termination timeout: ending %d requests", self.inflight)
            close = getattr(self.engine, "close", None)
            if close is not None:
                close(SHUTDOWN_MESSAGE)
            await self._wait_idle(FLUSH_TIMEOUT_S)
        logger.info("drained; shutting down")
        if self.on_drained is not None:
            self.on_drained()

    async def _wait_idle(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.inflight and loop.time() < deadline:
            await asyncio.sleep(POLL_S)
        return not self.inflight


class LifecycleMiddleware:
    """Counts POST requests in flight; while draining, answers new ones 503 at once."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.lifecycle.draining:
            response = JSONResponse(
                {"error": SHUTDOWN_MESSAGE, "error_type": "unavailable"},
                status_code=503,
                headers={"Connection": "close", "Retry-After": "1"},
            )
            await response(scope, receive, send)
            return
        self.lifecycle.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.inflight -= 1


# ------------------------------------------------------------------------------- probes
router = APIRouter(tags=["Operations"])
PROBE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Yes"},
    503: {
        "description": "No",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    },
}


def _probe(ok: bool, what: str) -> Response:
    if ok:
        return Response(status_code=200)
    return JSONResponse({"error": f"not {what}", "error_type": "healthcheck"}, status_code=503)


@router.get(
    "/live",
    summary="Liveness probe: the process is up",
    responses=PROBE_RESPONSES,
    response_class=Response,
)
async def live(request: Request) -> Response:
    return _probe(request.app.state.lifecycle.live, "live")


@router.get(
    "/ready",
    summary="Readiness probe: able to take requests",
    responses=PROBE_RESPONSES,
    response_class=Response,
)
async def ready(request: Request) -> Response:
    return _probe(request.app.state.lifecycle.ready, "ready")


# ------------------------------------------------------------------------------- server
class GracefulServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM/SIGINT drains (see the module doc) and the
    process then exits 0 instead of re-raising the signal."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        lifecycle.on_drained = self._exit
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def _exit(self) -> None:
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        sigs = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.lifecycle.draining or self._loop is None:
            logger.warning("second signal: exiting without waiting")
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT
            return
        logger.info("received %s: draining", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self.lifecycle.begin_drain)


def uvicorn_config(
    app: Any,
    host: str,
    port: int,
    *,
    keep_alive_timeout: float = 5.0,
    read_timeout: float = DEFAULT_READ_TIMEOUT_S,
    http_parser: str = "auto",
    **kwargs: Any,
) -> uvicorn.Config:
    """uvicorn with our slow-client and head-size limits (`limits.py`)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol_class(read_timeout, http_parser),
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        timeout_keep_alive=max(1, round(keep_alive_timeout)),
        timeout_graceful_shutdown=int(FLUSH_TIMEOUT_S),
        **kwargs,
    )


def serve(
    app: Any,
    host: str,
    port: int,
    *,
    keep_alive_timeout: float = 5.0,
    read_timeout: float = DEFAULT_READ_TIMEOUT_S,
) -> None:
    """Run `app` (from `build_app`) until a signal has drained it."""
    config = uvicorn_config(
        app,
        host,
        port,
        keep_alive_timeout=keep_alive_timeout,
        read_timeout=read_timeout,
        log_config=None,
    )
    GracefulServer(config, app.state.lifecycle).run()

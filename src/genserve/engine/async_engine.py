"""The engine thread and the asyncio side of it.

One dedicated thread loops `LLMEngine.step()` while there is work and sleeps on a condition
variable when there is none (0% CPU idle). The event loop posts requests and aborts into an inbox;
the thread hands each step's TokenEvents back with one `call_soon_threadsafe`, and they land in
per-request asyncio queues. The boundary is message-shaped, so the engine can move to its own
process later without touching the HTTP layer.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from genserve.engine.llm_engine import LLMEngine
from genserve.engine.request import Request, TokenEvent

log = logging.getLogger(__name__)


ENGINE_DOWN = "the engine is not running"


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._cond = threading.Condition()
        self._inbox: list[Request] = []
        self._aborts: list[str] = []
        self._queues: dict[str, asyncio.Queue[TokenEvent]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.healthy = False
        self._closed: str | None = None  # set by close(): new requests fail with this message
        self.step_listeners: list[Any] = []  # called in the engine thread after each step

    @classmethod
    def from_model(cls, model_id: str | None = None, **kwargs: Any) -> AsyncEngine:
        return cls(LLMEngine.from_model(model_id, **kwargs))

    # -------------------------------------------------------------- facts for the server
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_id(self) -> str:
        return self.engine.model_id

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def kv_capacity_tokens(self) -> int:
        return self.engine.kv_capacity_tokens

    @property
    def max_request_tokens(self) -> int:
        return self.engine.max_request_tokens

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + len(self._inbox)

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def num_live(self) -> int:
        """Requests with a consumer on the event loop (not yet finished, failed or aborted)."""
        return len(self._queues)

    @property
    def alive(self) -> bool:
        """The engine thread runs (liveness); `healthy` also needs it not to have crashed."""
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------------ lifecycle
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._stopping = False
        self._closed = None
        self._thread = threading.Thread(target=self._run, name="genserve-engine", daemon=True)
        self.healthy = True
        self._thread.start()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self.healthy = False

    # ------------------------------------------------------------------------- requests
    async def generate(self, request: Request) -> AsyncIterator[TokenEvent]:
        """Yields the request's events; leaving early (cancel, close) aborts it. A dead or
        closed engine answers at once with one error event (fail fast, never hang)."""
        rid = request.request_id
        if not self.healthy or self._closed is not None:
            yield TokenEvent(rid, -1, "", None, False, 0, error=self._closed or ENGINE_DOWN)
            return
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._queues[rid] = queue
        finished = False
        with self._cond:
            self._inbox.append(request)
            self._cond.notify()
        try:
            while True:
                event = await queue.get()
                finished = event.finished
                yield event
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify()

    def close(self, message: str) -> None:
        """End every live request with an error event carrying `message` and abort it in the
        engine (graceful termination past its timeout); later requests fail the same way.
        Call on the event loop."""
        self._closed = message
        for rid in list(self._queues):
            self.abort(rid)
        self._fail_all(message)

    # ---------------------------------------------------------------------- the thread
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (
                        self._stopping
                        or self._inbox
                        or self._aborts
                        or self.engine.has_unfinished()
                    ):
                        self._cond.wait()
                    if self._stopping:
                        return
                    # handed over under the lock, so a request is always counted somewhere
                    # (inbox or scheduler) by num_waiting / num_running
                    for req in self._inbox:
                        self._add(req)
                    for rid in self._aborts:
                        self.engine.abort(rid)
                    self._inbox.clear()
                    self._aborts.clear()
                events = self.engine.step()
                for listener in self.step_listeners:
                    listener(self.engine)
                if events:
                    self._loop.call_soon_threadsafe(self._dispatch, events)
        except BaseException:  # noqa: BLE001 - the thread must report its death
            log.exception("engine thread died")
            self.healthy = False
            self._loop.call_soon_threadsafe(self._fail_all, ENGINE_DOWN)

    def _add(self, req: Request) -> None:
        """A request the engine cannot take fails alone; the thread goes on."""
        try:
            self.engine.add_request(req)
        except Exception as e:  # noqa: BLE001 - isolate it to this request
            log.exception("could not add request %s", req.request_id)
            error = TokenEvent(req.request_id, -1, "", None, False, 0, error=f"{e}")
            self._loop.call_soon_threadsafe(self._dispatch, [error])

    def _dispatch(self, events: list[TokenEvent]) -> None:
        for event in events:
            queue = self._queues.get(event.request_id)
            if queue is not None:
                queue.put_nowait(event)

    def _fail_all(self, message: str) -> None:
        for rid, queue in list(self._queues.items()):
            queue.put_nowait(TokenEvent(rid, -1, "", None, False, 0, error=message))

"""The real server (real engine, tiny model) as `genserve launch` runs it: our uvicorn config
(slow-client limits) and `GracefulServer` (no signals in a thread), plus the checks the
reliability tests share: the engine idle, its KV blocks all free, nothing left counted."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from real_server import make_engine
from server_harness import free_port

from genserve.config import CacheConfig
from genserve.server.app import build_app
from genserve.server.lifecycle import GracefulServer, uvicorn_config
from genserve.server.settings import ServerSettings

SMALL_CACHE = {"cache_config": CacheConfig(memory_bytes=4 << 20)}


@dataclass
class Served:
    url: str
    engine: Any  # AsyncEngine
    app: Any
    server: GracefulServer

    @property
    def service(self) -> Any:
        return self.app.state.service

    @property
    def lifecycle(self) -> Any:
        return self.app.state.lifecycle

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def on_loop(self, fn: Callable[[], Any]) -> None:
        """Run `fn` on the server's event loop (where the app state lives)."""
        self.engine._loop.call_soon_threadsafe(fn)


@contextmanager
def reliable_server(
    model_dir: Path, engine_kw: dict | None = None, http_parser: str = "auto", **settings: Any
) -> Iterator[Served]:
    engine = make_engine(model_dir, **{**SMALL_CACHE, **(engine_kw or {})})
    max_total = settings.pop("max_total_tokens", 256)
    base = dict(model_id="tiny", max_input_tokens=max_total - 1, max_total_tokens=max_total)
    app = build_app(engine, ServerSettings(**{**base, **settings}))
    config = uvicorn_config(
        app,
        "127.0.0.1",
        free_port(),
        read_timeout=app.state.settings.request_read_timeout,
        http_parser=http_parser,
        log_level="warning",
        lifespan="on",
    )
    server = GracefulServer(config, app.state.lifecycle)
    thread = threading.Thread(target=server.run, name="uvicorn-reliability", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive(), "uvicorn exited during start-up"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield Served(f"http://127.0.0.1:{config.port}", engine, app, server)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_until(cond: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what or cond}"
        time.sleep(0.01)


def engine_idle(engine: Any) -> bool:
    inner = engine.engine
    return not (engine.num_live or inner.has_unfinished() or engine._inbox or engine._aborts)


def assert_clean(served: Served, timeout: float = 30.0) -> None:
    """Nothing in flight anywhere; the scheduler consistent; every KV block free."""
    engine = served.engine
    wait_until(lambda: engine_idle(engine), timeout, "the engine to be idle")
    wait_until(lambda: served.lifecycle.inflight == 0, timeout, "no request in flight")
    with engine._cond:  # the engine thread cannot start a step while we look
        inner = engine.engine
        inner.scheduler.check_integrity()
        bm = inner.block_manager
        assert bm.num_used_blocks == 0, f"{bm.num_used_blocks} KV blocks leaked"
        assert bm.num_free_blocks == bm.num_usable_blocks
        assert not inner._live, "per-request engine state leaked"
    assert served.service.permits.in_use == 0, "concurrency permits leaked"
    assert served.service.permits.reserved == 0, "load-shedding reservations leaked"
    assert served.service.queued_tokens.queued == 0, "queued-token budget leaked"


def sse_events(lines: list[str]) -> list[dict]:
    return [json.loads(line[5:]) for line in lines if line.startswith("data:")]


async def read_stream(client: Any, path: str, body: dict, stop_after: int | None = None) -> list:
    """The stream's JSON events; with `stop_after`, leave (disconnect) after that many."""
    events = []
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.status_code
        async for line in r.aiter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":  # OpenAI's end
                events.append(json.loads(line[5:]))
                if stop_after is not None and len(events) >= stop_after:
                    return events
    return events


def run(coro: Any) -> Any:
    return asyncio.run(coro)

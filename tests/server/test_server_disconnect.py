"""A client that goes away aborts its request at once; the KV blocks come back (real engine)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from real_server import USE_FAKE, real_server

from genserve.engine.block_manager import BlockManager


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with real_server(tiny_llama_dir) as (url, engine):
        yield url, engine


def find_block_manager(
    obj: Any, depth: int = 4, seen: set[int] | None = None
) -> BlockManager | None:
    seen = set() if seen is None else seen
    if isinstance(obj, BlockManager):
        return obj
    if (
        depth == 0
        or id(obj) in seen
        or not hasattr(obj, "__dict__")
        and not hasattr(obj, "__slots__")
    ):
        return None
    seen.add(id(obj))
    names = list(getattr(obj, "__dict__", {})) + list(getattr(obj, "__slots__", ()))
    for name in names:
        found = find_block_manager(getattr(obj, name, None), depth - 1, seen)
        if found is not None:
            return found
    return None


def _idle(engine: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.num_running or engine.num_waiting:
        assert time.monotonic() < deadline, "request still in the engine after the client left"
        time.sleep(0.02)


def _check_blocks(engine: Any) -> None:
    if USE_FAKE:
        return
    bm = find_block_manager(engine)
    assert bm is not None, "no BlockManager reachable from the engine"
    bm.check_integrity()
    assert bm.num_used_blocks == 0


def test_stream_disconnect_aborts(server):
    url, engine = server
    body = {"inputs": "Tell me a long story", "parameters": {"max_new_tokens": 400}}
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=60) as r:
        first = next(r.iter_lines())
        assert first.startswith("data:{")
        if not USE_FAKE:
            assert engine.num_running + engine.num_waiting == 1
    t0 = time.monotonic()
    _idle(engine)
    assert time.monotonic() - t0 < 5.0
    _check_blocks(engine)


def test_non_stream_disconnect_aborts(server):
    url, engine = server
    body = {"inputs": "Tell me a long story", "parameters": {"max_new_tokens": 400}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/generate", json=body, timeout=0.5)
    _idle(engine)
    _check_blocks(engine)


def test_server_still_serves_after_disconnects(server):
    url, engine = server
    r = httpx.post(
        f"{url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}}, timeout=60
    )
    assert r.status_code == 200 and r.headers["x-generated-tokens"] == "3"
    _check_blocks(engine)

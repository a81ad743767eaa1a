"""Fault isolation: an exception in a model step fails exactly that step's requests (TGI's 424
`generation` error, or an SSE error event), frees their blocks, is logged once, and the engine
goes on. If the engine thread itself dies, probes turn 503 and requests fail fast."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest
from reliability_util import assert_clean, read_stream, reliable_server, wait_until

GENEROUS_S = 5.0


@pytest.fixture(scope="module")
def served(tiny_llama_dir):
    with reliable_server(tiny_llama_dir) as s:
        yield s


class FailOnce:
    """Raise in the first step that has `min_batch` requests in it; remember who was in it."""

    def __init__(self, min_batch: int = 1) -> None:
        self.min_batch = min_batch
        self.failed_ids: list[str] = []

    def __call__(self, out) -> None:
        if not self.failed_ids and len(out.scheduled) >= self.min_batch:
            self.failed_ids = [s.request.request_id for s in out.scheduled]
            raise RuntimeError("injected fault")


async def _burst(url: str, n: int) -> list[httpx.Response]:
    body = {"inputs": "Fault me", "parameters": {"max_new_tokens": 6}}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*(client.post("/generate", json=body) for _ in range(n)))


def test_fault_fails_only_that_step(served, caplog):
    hook = FailOnce(min_batch=1)
    served.engine.engine.fault_hook = hook
    try:
        with caplog.at_level(logging.ERROR, logger="genserve.engine.llm_engine"):
            responses = asyncio.run(_burst(served.url, 4))
    finally:
        served.engine.engine.fault_hook = None
    failed = [r for r in responses if r.status_code == 424]
    assert len(failed) == len(hook.failed_ids) >= 1
    assert all(r.status_code in (200, 424) for r in responses)
    for r in failed:
        body = r.json()
        assert body["error_type"] == "generation"
        assert body["error"].startswith("Request failed during generation: ")
        assert "injected fault" in body["error"] and "Traceback" not in body["error"]
    tracebacks = [r for r in caplog.records if r.exc_info and "step failed" in r.getMessage()]
    assert len(tracebacks) == 1  # logged once, for the whole step
    assert_clean(served)
    ok = httpx.post(
        f"{served.url}/generate", json={"inputs": "After", "parameters": {}}, timeout=60
    )
    assert ok.status_code == 200  # the engine went on


def test_fault_in_a_stream_is_an_error_event(served):
    served.engine.engine.fault_hook = FailOnce()

    async def go() -> list:
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            body = {"inputs": "Stream fault", "parameters": {"max_new_tokens": 6}}
            return await read_stream(client, "/generate_stream", body)

    try:
        events = asyncio.run(go())
    finally:
        served.engine.engine.fault_hook = None
    assert len(events) == 1 and events[0]["error_type"] == "generation"
    assert "injected fault" in events[0]["error"]
    assert_clean(served)


def test_fault_mid_decode_frees_blocks(served):
    """A fault after some tokens were generated: the request holding blocks fails, the blocks
    come back, the next request runs."""
    calls = {"n": 0}

    def hook(out) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected mid-decode")

    served.engine.engine.fault_hook = hook
    try:
        events = asyncio.run(_stream(served.url, 50))
    finally:
        served.engine.engine.fault_hook = None
    assert events[-1].get("error_type") == "generation" and len(events) >= 2
    assert_clean(served)


async def _stream(url: str, max_new: int) -> list:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        body = {"inputs": "Decode a while", "parameters": {"max_new_tokens": max_new}}
        return await read_stream(client, "/generate_stream", body)


class EngineKilled(BaseException):
    """Not an Exception: escapes the step's isolation and ends the engine thread."""


def test_dead_engine_fails_fast(tiny_llama_dir):
    with reliable_server(tiny_llama_dir) as served:
        inner = served.engine.engine
        original = inner.scheduler.schedule
        state = {"n": 0}

        def schedule():
            state["n"] += 1
            if state["n"] >= 3:
                raise EngineKilled("the engine thread dies")
            return original()

        inner.scheduler.schedule = schedule
        with httpx.Client(base_url=served.url, timeout=60) as client:
            # a request in flight when the thread dies fails (no hang)
            r = client.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 50}})
            assert r.status_code == 424 and r.json()["error_type"] == "generation"
            wait_until(lambda: not served.engine.alive, 10, "the engine thread to end")
            assert client.get("/health").status_code == 503
            assert client.get("/ready").status_code == 503
            assert client.get("/live").status_code == 503  # let the orchestrator restart us
            t0 = time.perf_counter()
            r = client.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 5}})
            took = time.perf_counter() - t0
            assert r.status_code == 424 and "not running" in r.json()["error"]
            s = client.post("/generate_stream", json={"inputs": "x", "parameters": {}})
            assert s.status_code == 200 and '"error_type":"generation"' in s.text
            assert client.get("/metrics").status_code == 200
        assert took < GENEROUS_S

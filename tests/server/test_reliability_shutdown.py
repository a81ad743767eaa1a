"""Graceful termination. SIGTERM: new requests 503, readiness 503 while liveness stays 200,
requests in flight finish up to `--graceful-termination-timeout`, the rest end with an explicit
error event (424 when not streaming), and the process exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from reliability_util import assert_clean, read_stream, reliable_server, wait_until
from server_harness import free_port

SHUTDOWN = "Request failed during generation: the server is shutting down"


def _outcome(events: list[dict]) -> str:
    """A stream ends either with its final event or with an error event, nothing else."""
    assert events, "a stream ended with no event at all"
    last = events[-1]
    if "error" in last:
        assert last["error_type"] == "generation" and last["error"] == SHUTDOWN, last
        return "error"
    assert last["generated_text"] is not None, f"cut without an error event: {last}"
    return "finished"


def test_drain_ends_the_rest_with_an_error(tiny_llama_dir):
    """In process: a slow engine, a short timeout, so the timeout path is certain."""
    with reliable_server(tiny_llama_dir, graceful_termination_timeout=0.5) as served:
        drained = threading.Event()
        served.lifecycle.on_drained = drained.set
        served.engine.engine.fault_hook = lambda out: time.sleep(0.02)
        long = {"inputs": "Keep going", "parameters": {"max_new_tokens": 200}}

        async def go() -> tuple[list, httpx.Response, dict]:
            async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
                streams = [
                    asyncio.ensure_future(read_stream(client, "/generate_stream", long))
                    for _ in range(3)
                ]
                plain = asyncio.ensure_future(client.post("/generate", json=long))
                await asyncio.to_thread(
                    wait_until, lambda: served.engine.num_live == 4, 30, "4 live requests"
                )
                served.on_loop(served.lifecycle.begin_drain)
                await asyncio.to_thread(
                    wait_until, lambda: served.lifecycle.draining, 10, "draining"
                )
                probes = {
                    "health": (await client.get("/health")).status_code,
                    "ready": (await client.get("/ready")).status_code,
                    "live": (await client.get("/live")).status_code,
                }
                refused = await client.post("/generate", json=long)
                probes["refused"] = refused.status_code
                probes["refused_body"] = refused.json()
                probes["connection"] = refused.headers.get("connection")
                return list(await asyncio.gather(*streams)), await plain, probes

        streams, plain, probes = asyncio.run(go())
        assert drained.wait(10)
        assert probes["health"] == probes["ready"] == 503 and probes["live"] == 200
        assert probes["refused"] == 503 and probes["connection"] == "close"
        assert probes["refused_body"]["error_type"] == "unavailable"
        assert [_outcome(e) for e in streams] == ["error"] * 3
        assert plain.status_code == 424 and plain.json()["error"] == SHUTDOWN
        served.engine.engine.fault_hook = None
        assert_clean(served)


@pytest.fixture()
def launched(tiny_llama_dir):
    """`genserve launch` in a subprocess, as a container runs it."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "genserve.cli", "launch",
        "--model-id", str(tiny_llama_dir), "--dtype", "float32", "--port", str(port),
        "--hostname", "127.0.0.1", "--kv-cache-memory", "8MiB", "--max-total-tokens", "512",
        "--graceful-termination-timeout", "2",
    ]  # fmt: skip
    env = {**os.environ, "LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the server did not become ready"
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def test_sigterm_with_16_live_streams_exits_0(launched):
    url, proc = launched

    async def go() -> tuple[list, dict]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            seen = [0] * 16

            async def stream(i: int) -> list:
                body = {"inputs": f"Stream {i}", "parameters": {"max_new_tokens": 8 + 30 * i}}
                events = []
                async with client.stream("POST", "/generate_stream", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data:"):
                            events.append(json.loads(line[5:]))
                            seen[i] += 1
                return events

            tasks = [asyncio.ensure_future(stream(i)) for i in range(16)]
            while not all(seen) and not all(t.done() for t in tasks):
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            probes = {}
            try:
                probes["health"] = (await client.get("/health")).status_code
                probes["live"] = (await client.get("/live")).status_code
                probes["new"] = (await client.post("/generate", json={"inputs": "x"})).status_code
            except httpx.TransportError as exc:  # already gone: every stream was done
                probes["gone"] = repr(exc)
            return list(await asyncio.gather(*tasks)), probes

    streams, probes = asyncio.run(go())
    outcomes = [_outcome(events) for events in streams]
    code = proc.wait(60)
    print("SIGTERM outcomes:", {o: outcomes.count(o) for o in set(outcomes)}, probes)
    assert code == 0, proc.stdout.read().decode()[-3000:]
    if "gone" not in probes:
        assert probes == {"health": 503, "live": 200, "new": 503}

"""Bounded waiting: past `--max-concurrent-requests` or `--max-queued-tokens` a request is
refused at once (429 + Retry-After, or TGI's overloaded SSE event on a stream); a request
that could never fit the KV cache is a 422, never a hang. Timings are recorded, and asserted
only generously (a shared 2-core machine)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx
import pytest
from reliability_util import assert_clean, read_stream, reliable_server, wait_until

from genserve.config import CacheConfig
from genserve.engine.request import Request
from genserve.sampling.params import StoppingParams
from genserve.server.errors import OverloadedError
from genserve.server.generation import QueuedTokens

CAP = 4
N_OVER = 40
# The target is 50 ms for every refusal (bench/overload.py measures it in a quiet process: 872
# at once, all within 50 ms). Here client, server and engine share one process and a loaded CI
# machine, so only a broken server misses this bound.
GENEROUS_S = 1.0


@pytest.fixture(scope="module")
def served(tiny_llama_dir):
    with reliable_server(tiny_llama_dir, max_concurrent_requests=CAP) as s:
        yield s


async def _burst_429(
    url: str, n: int, max_new_tokens: int = 5
) -> list[tuple[float, int, dict, bytes]]:
    """`n` connections opened first, then one request written on each at once; each timed
    from its write to its whole response (raw sockets: httpx's own cost stays out)."""
    host, port = url.removeprefix("http://").split(":")
    params = {"max_new_tokens": max_new_tokens}
    body = json.dumps({"inputs": "Over the cap", "parameters": params}).encode()
    raw = (
        f"POST /generate HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    conns = await asyncio.gather(*(asyncio.open_connection(host, int(port)) for _ in range(n)))
    sent = []
    for _, writer in conns:
        writer.write(raw)
        sent.append(time.perf_counter())

    async def finish(i: int) -> tuple[float, int, dict, bytes]:
        reader, writer = conns[i]
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        reply = await reader.readexactly(int(headers["content-length"]))
        took = time.perf_counter() - sent[i]
        writer.close()
        return took, status, headers, reply

    return await asyncio.gather(*(finish(i) for i in range(n)))


def test_concurrency_cap_answers_429_fast(served, record_property):
    async def go() -> tuple[list, list]:
        hold = {"inputs": "Hold a permit", "parameters": {"max_new_tokens": 200}}
        limits = httpx.Limits(max_connections=CAP + 8)
        async with httpx.AsyncClient(base_url=served.url, timeout=60, limits=limits) as client:
            holders = [
                asyncio.ensure_future(read_stream(client, "/generate_stream", hold))
                for _ in range(CAP)
            ]
            await asyncio.to_thread(
                wait_until, lambda: served.service.permits.in_use == CAP, 60, "permits"
            )
            over = await _burst_429(served.url, N_OVER)
            body = {"inputs": "Over the cap", "parameters": {"max_new_tokens": 5}}
            streams = await asyncio.gather(
                *(read_stream(client, "/generate_stream", body) for _ in range(4))
            )
            for task in holders:
                task.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
        return over, streams

    over, streams = asyncio.run(go())
    latencies = sorted(t for t, *_ in over)
    for _, status, headers, reply in over:
        assert status == 429
        assert json.loads(reply) == {"error": "Model is overloaded", "error_type": "overloaded"}
        assert int(headers["retry-after"]) >= 1
    for events in streams:  # TGI: overload inside the stream, as an SSE error event
        assert events == [{"error": "Model is overloaded", "error_type": "overloaded"}]
    p50, worst = statistics.median(latencies), latencies[-1]
    record_property("overload_429_p50_ms", round(p50 * 1000, 1))
    record_property("overload_429_max_ms", round(worst * 1000, 1))
    print(f"429 latency over {N_OVER}: p50 {p50 * 1000:.1f} ms, max {worst * 1000:.1f} ms")
    assert worst < GENEROUS_S
    assert_clean(served)
    r = httpx.post(f"{served.url}/generate", json={"inputs": "Hi", "parameters": {}}, timeout=60)
    assert r.status_code == 200  # healthy after


def test_simultaneous_arrivals_admitted_in_order(served):
    """With every permit free, 40 requests that arrive together: exactly CAP are admitted
    (load shedding counts the ones on their way to a permit) and the rest get their 429 at
    once, not after racing to their handlers; nothing is left reserved."""
    state, answered = served.app.state, []
    fast = state.fast_shed
    state.fast_shed = lambda *a: answered.append(reply := fast(*a)) or reply
    try:
        over = asyncio.run(_burst_429(served.url, 40, max_new_tokens=120))
    finally:
        state.fast_shed = fast
    codes = sorted(status for _, status, *_ in over)
    assert codes == [200] * CAP + [429] * (40 - CAP), codes
    # every refusal given by the HTTP protocol on arrival (none by a handler)
    assert sum(isinstance(r, bytes) for r in answered) == 40 - CAP
    assert_clean(served)


def test_queued_tokens_bound(served, tiny_llama_dir):
    """While one long prompt waits for its first token, a second that would push the queued
    prompt tokens past the bound is refused at once; an empty queue admits anything."""
    tok = served.app.state.tokenizer
    prompt = "one two three four five six seven eight nine ten " * 3
    n = len(tok.encode(prompt, add_special_tokens=True))
    queue = served.service.queued_tokens
    queue.limit = 2 * n - 1  # one such prompt fits, two do not
    inner = served.engine.engine
    inner.fault_hook = lambda out: time.sleep(0.4)  # a slow engine: prompts stay queued
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 2}}
    try:
        with httpx.Client(base_url=served.url, timeout=60) as client:

            async def first() -> httpx.Response:
                async with httpx.AsyncClient(base_url=served.url, timeout=60) as c:
                    return await c.post("/generate", json=body)

            import threading

            result: dict = {}
            t = threading.Thread(target=lambda: result.update(r=asyncio.run(first())))
            t.start()
            wait_until(lambda: queue.queued >= n, 30, "the first prompt queued")
            t0 = time.perf_counter()
            refused = client.post("/generate", json=body)
            took = time.perf_counter() - t0
            stream = client.post("/generate_stream", json=body)
            t.join(60)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error_type"] == "overloaded"
        assert '"error_type":"overloaded"' in stream.text
        assert took < GENEROUS_S
        print(f"queued-tokens 429 in {took * 1000:.1f} ms")
        assert result["r"].status_code == 200
        inner.fault_hook = None
        queue.limit = n // 2  # smaller than the prompt: still admitted when nothing waits
        assert httpx.post(f"{served.url}/generate", json=body, timeout=60).status_code == 200
    finally:
        inner.fault_hook = None
        queue.limit = None
    assert_clean(served)


def test_queued_tokens_unit():
    q = QueuedTokens(10)
    q.check(50)  # empty: always admitted
    q.add(6)
    q.check(4)
    with pytest.raises(OverloadedError):
        q.check(5)
    q.remove(6)
    assert q.queued == 0
    QueuedTokens(None).check(10**9)


@pytest.fixture(scope="module")
def tiny_kv(tiny_llama_dir):
    """8 usable blocks of 16 = 128 KV tokens, while max_total_tokens says 256."""
    kw = {"cache_config": CacheConfig(num_blocks=9, block_size=16)}
    with reliable_server(tiny_llama_dir, engine_kw=kw, max_total_tokens=256) as s:
        yield s


def test_never_fits_the_kv_cache_is_422(tiny_kv):
    t0 = time.perf_counter()
    r = httpx.post(
        f"{tiny_kv.url}/generate",
        json={"inputs": "Hello", "parameters": {"max_new_tokens": 200}},
        timeout=30,
    )
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation"
    assert "KV cache capacity" in r.json()["error"]
    assert time.perf_counter() - t0 < GENEROUS_S
    # without max_new_tokens the request is bounded by what fits, and runs
    events = asyncio.run(_first_event(tiny_kv.url))
    assert "token" in events[0]
    assert_clean(tiny_kv)


async def _first_event(url: str) -> list:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        body = {"inputs": "Hello", "parameters": {"details": True}}
        return await read_stream(client, "/generate_stream", body, stop_after=1)


def test_engine_refuses_what_never_fits(tiny_kv):
    """Defence in depth (the offline API, or a misconfigured server): the engine itself fails
    such a request with an error event instead of livelocking on preemption."""
    engine = tiny_kv.engine

    async def collect() -> list:
        req = Request("too-big", list(range(200, 300)), stopping=StoppingParams(100))
        return [ev async for ev in engine.generate(req)]

    events = asyncio.run_coroutine_threadsafe(collect(), engine._loop).result(30)
    assert len(events) == 1 and "KV cache" in events[0].error
    assert_clean(tiny_kv)


def test_launcher_flags():
    from genserve.cli import build_parser
    from genserve.server.launcher import (
        ArgumentValidation,
        check_arguments,
        resolve_max_queued_tokens,
        resolve_token_limits,
    )

    def parse(argv, env=None):
        return build_parser(env or {}).parse_args(["launch", *argv])

    a = parse([])
    assert (a.max_queued_tokens, a.request_read_timeout, a.keep_alive_timeout) == (None, 30.0, 5.0)
    assert resolve_max_queued_tokens(a, kv_tokens=5000, max_input=100) == 5000
    assert resolve_max_queued_tokens(parse(["--max-queued-tokens", "0"]), 5000, 100) is None
    env = parse([], {"MAX_QUEUED_TOKENS": "777", "REQUEST_READ_TIMEOUT": "2.5"})
    assert (env.max_queued_tokens, env.request_read_timeout) == (777, 2.5)
    with pytest.raises(ArgumentValidation, match="max_queued_tokens"):
        check_arguments(parse(["--max-queued-tokens", "-1"]))
    # a max_total_tokens larger than the KV cache could never run one request: refused (TGI)
    with pytest.raises(ArgumentValidation, match="Not enough memory"):
        resolve_token_limits(parse(["--max-total-tokens", "2000"]), 4096, 1000)

"""The three load phases of `bench/soak.py`: soak (with disconnects), burst, fuzz."""

from __future__ import annotations

import asyncio
import gc
import json
import random
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

WORDS = "the a cat dog runs over under river light house blue green story time".split()


def _pick(rng: random.Random) -> tuple[str, dict, bool]:
    """One request of the mix: (path, body, is a stream)."""
    prompt = " ".join(rng.choices(WORDS, k=rng.randint(2, 24)))
    n = rng.randint(1, 40)
    roll = rng.random()
    if roll < 0.30:
        return "/generate_stream", {"inputs": prompt, "parameters": {"max_new_tokens": n}}, True
    if roll < 0.45:
        return "/generate", {"inputs": prompt, "parameters": {"max_new_tokens": n}}, False
    if roll < 0.55:
        params = {"max_new_tokens": n, "best_of": 2, "do_sample": True, "details": True}
        return "/generate", {"inputs": prompt, "parameters": params}, False
    if roll < 0.65:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": n}, "stream": True}
        return "/", body, True
    chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": n}
    if roll < 0.75:
        return "/v1/chat/completions", {**chat, "stream": True}, True
    if roll < 0.85:
        return "/v1/chat/completions", chat, False
    stream = roll < 0.92
    body = {"prompt": prompt, "max_tokens": n, "stream": stream}
    return "/v1/completions", body, stream


async def _one(session: Any, url: str, rng: random.Random, leave_p: float, out: Counter) -> None:
    import aiohttp

    path, body, stream = _pick(rng)
    leave = rng.random() < leave_p
    try:
        if stream:
            async with session.post(url + path, json=body) as r:
                out[f"status_{r.status}"] += 1
                stop_after = rng.randint(1, 8) if leave else None
                seen = 0
                async for line in r.content:
                    seen += line.startswith(b"data:")
                    if stop_after is not None and seen >= stop_after:
                        r.close()  # leave mid-stream: the connection goes away
                        out["left_stream"] += 1
                        return
        elif leave:
            try:
                async with asyncio.timeout(rng.uniform(0.0, 0.4)):
                    async with session.post(url + path, json=body) as r:
                        await r.read()
                        out[f"status_{r.status}"] += 1
            except TimeoutError:
                out["left_request"] += 1
        else:
            async with session.post(url + path, json=body) as r:
                await r.read()
                out[f"status_{r.status}"] += 1
    except aiohttp.ClientError as exc:
        out["transport_errors"] += 1
        out[f"transport:{type(exc).__name__}"] += 1


async def _closed_loop(url: str, n: int, clients: int, leave_p: float, seed: int) -> Counter:
    import aiohttp

    out: Counter = Counter()
    todo = iter(range(n))
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=300)
    connector = aiohttp.TCPConnector(limit=clients * 2)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def client() -> None:
            for _ in todo:
                await _one(session, url, rng, leave_p, out)

        await asyncio.gather(*(client() for _ in range(clients)))
    return out


def soak(server: Any, args: Any) -> dict:
    t0 = time.perf_counter()
    warm = asyncio.run(_closed_loop(server.url, args.warmup, args.clients, args.disconnect, 1))
    after_warmup = server.stats()
    t1 = time.perf_counter()
    out = asyncio.run(
        _closed_loop(server.url, args.requests, args.clients, args.disconnect, args.seed)
    )
    elapsed = time.perf_counter() - t1
    after = server.stats()
    rss0, rss1 = after_warmup["rss_mb"], after["rss_mb"]
    result = {
        "warmup_requests": args.warmup,
        "warmup_s": round(t1 - t0, 1),
        "warmup_outcomes": dict(warm),
        "requests": args.requests,
        "clients": args.clients,
        "elapsed_s": round(elapsed, 1),
        "requests_per_s": round(args.requests / elapsed, 1),
        "outcomes": dict(out),
        "http_5xx": sum(v for k, v in out.items() if k.startswith("status_5")),
        "transport_errors": out["transport_errors"],
        "left": out["left_stream"] + out["left_request"],
        "rss_after_warmup_mb": rss0,
        "rss_end_mb": rss1,
        "rss_growth_pct": round(100 * (rss1 - rss0) / rss0, 2),
        "stats_after_warmup": after_warmup,
        "stats_after": after,
    }
    print("soak:", json.dumps(result), flush=True)
    return result


# --------------------------------------------------------------------------------- burst
async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def _burst(url: str, n: int, body: dict) -> list[tuple[int, float]]:
    u = urlparse(url)
    payload = json.dumps(body).encode()
    raw = (
        f"POST /generate HTTP/1.1\r\nHost: {u.hostname}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    conns = await asyncio.gather(*(asyncio.open_connection(u.hostname, u.port) for _ in range(n)))
    sent = []
    for _, writer in conns:  # every connection is open: now all requests at once
        writer.write(raw)
        sent.append(time.perf_counter())

    async def finish(i: int) -> tuple[int, float]:
        reader, writer = conns[i]
        status, _ = await _read_response(reader)
        took = time.perf_counter() - sent[i]
        writer.close()
        return status, took

    return await asyncio.gather(*(finish(i) for i in range(n)))


def _long_prompt(url: str, max_new: int) -> str:
    """A prompt whose greedy continuation runs the full `max_new` tokens (no early EOS), so
    each of the `cap` admitted requests holds its permit for the whole burst."""
    import httpx

    for i in range(20):
        prompt = f"Burst prompt number {i}: " + " ".join(WORDS)
        body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new, "details": True}}
        r = httpx.post(f"{url}/generate", json=body, timeout=300)
        if r.status_code == 200 and r.json()["details"]["finish_reason"] == "length":
            return prompt
    raise RuntimeError("no prompt runs to its length")


def burst(server: Any, args: Any) -> dict:
    import httpx

    max_new = 300
    prompt = _long_prompt(server.url, max_new)
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new}}
    t0 = time.perf_counter()
    gc.disable()  # this client's own collections would show up as server latency
    try:
        results = asyncio.run(_burst(server.url, args.burst, body))
    finally:
        gc.enable()
    elapsed = time.perf_counter() - t0
    codes = Counter(status for status, _ in results)
    lat429 = sorted(t for status, t in results if status == 429)
    health = httpx.get(f"{server.url}/health", timeout=30).status_code
    after = httpx.post(f"{server.url}/generate", json={"inputs": "after", "parameters": {}})
    stats = server.stats()

    def q(p: float) -> float | None:
        return (
            round(1000 * lat429[min(len(lat429) - 1, int(p * len(lat429)))], 1) if lat429 else None
        )

    ok_times = [t for s, t in results if s == 200]
    result = {
        "connections": args.burst,
        "cap": args.cap,
        "codes": {str(k): v for k, v in codes.items()},
        "expected_429": args.burst - args.cap,
        "exact": codes.get(200, 0) == args.cap and codes.get(429, 0) == args.burst - args.cap,
        "latency_429_ms": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": q(1.0)},
        "median_200_s": round(statistics.median(ok_times), 2) if ok_times else None,
        "elapsed_s": round(elapsed, 1),
        "healthy_after": health == 200 and after.status_code == 200,
        "stats_after": stats,
    }
    print("burst:", json.dumps(result), flush=True)
    return result


# ---------------------------------------------------------------------------------- fuzz
def _fuzz_schema(schema: Any, url: str, total: int, checks: list) -> dict:
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    ops = [r.ok() for r in schema.get_all_operations()]
    posts = [op for op in ops if op.method.upper() == "POST"]
    per = -(-total // (2 * max(len(posts), 1))) + 5
    out: Counter = Counter()
    failures: dict[str, str] = {}
    for op in ops:
        post = op.method.upper() == "POST"
        for mode in (
            (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
            if post
            else (GenerationMode.POSITIVE,)
        ):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=per if post else 3, deadline=None, database=None,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
            def run(case: Any) -> None:
                r = case.call(base_url=url, timeout=120)
                out["cases"] += 1
                out[f"status_{r.status_code}"] += 1
                try:
                    case.validate_response(r, checks=checks)
                except BaseException as exc:  # noqa: BLE001 - count, keep going
                    title = str(exc).split("\n- ", 1)[-1].split("\n", 1)[0]
                    out["violations"] += 1
                    failures.setdefault(
                        f"{case.operation.label}: {title}", case.as_curl_command()[:300]
                    )

            try:
                run()
            except Exception as exc:  # noqa: BLE001 - e.g. a schema schemathesis cannot cover
                out["unsupported"] += 1
                failures.setdefault(f"{op.label}: not generated", str(exc).split("\n", 1)[0])
    return {
        "cases": out["cases"],
        "http_5xx": sum(v for k, v in out.items() if k.startswith("status_5")),
        "statuses": {k: v for k, v in sorted(out.items()) if k.startswith("status_")},
        "violations": out["violations"],
        "distinct_violations": failures,
    }


def _as_openapi_30(node: Any) -> Any:
    """TGI's document says `openapi: 3.0.3` but writes JSON Schema 2020-12 numeric bounds
    (`"exclusiveMinimum": 0`), which schemathesis cannot generate integers for. Rewrite them in
    3.0's form (`"minimum": 0, "exclusiveMinimum": true`): the same constraint."""
    if isinstance(node, list):
        return [_as_openapi_30(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _as_openapi_30(v) for k, v in node.items()}
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        value = out.get(bound)
        if isinstance(value, int | float) and not isinstance(value, bool):
            if plain in out:  # both given: keep the tighter one
                out[plain] = (
                    max(out[plain], value) if plain == "minimum" else min(out[plain], value)
                )
            else:
                out[plain] = value
            out[bound] = out[plain] == value
    return out


def fuzz(server: Any, args: Any) -> dict:
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    ours = schemathesis.openapi.from_url(f"{server.url}/api-doc/openapi.json")
    strict = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    t0 = time.perf_counter()
    result = {"ours": _fuzz_schema(ours, server.url, args.fuzz, strict)}
    tgi = schemathesis.openapi.from_dict(
        _as_openapi_30(json.loads(Path(args.tgi_spec).read_text()))
    )
    result["tgi"] = _fuzz_schema(tgi, server.url, args.fuzz, [not_a_server_error])
    for name, r in result.items():
        print(f"fuzz {name}:", json.dumps(r)[:2000], flush=True)
    return {**result, "elapsed_s": round(time.perf_counter() - t0, 1)}

"""How fast an over-cap request gets its 429 while the server is busy (issue 8: within 50 ms).

One `genserve` server process (the soak's child, `bench/soak.py`) with a concurrency cap; `cap`
long generations hold every permit, so the engine is busy the whole time. Then, from this
process, over raw keep-alive sockets (the client's own cost stays out of the numbers):

- lone: `--lone` requests one at a time, 20 ms apart: time from writing the request to having
  read the whole 429 response;
- burst: `--burst` requests written at once on pre-opened connections, each timed the same way.

Beside them, as the reference measured the same way in the same run: `GET /health` (a route
with no generation and no permit), lone and in a burst of the same size.

    python bench/overload.py                  # the tiny test model (built by `make test`)
    python bench/overload.py --model-id DIR --cap 8 --burst 200
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from soak import TINY, Server  # noqa: E402
from soak_load import _read_response  # noqa: E402


def _raw(method: str, path: str, body: dict | None) -> bytes:
    payload = b"" if body is None else json.dumps(body).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\n"
    if body is not None:
        head += f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n"
    return (head + "\r\n").encode() + payload


async def _hold(url_port: int, cap: int, max_new: int) -> list:
    """`cap` streams that keep their permits: read only their response heads."""
    body = {"inputs": "Hold the permit " * 4, "parameters": {"max_new_tokens": max_new}}
    raw = _raw("POST", "/generate_stream", body)
    conns = []
    for _ in range(cap):
        reader, writer = await asyncio.open_connection("127.0.0.1", url_port)
        writer.write(raw)
        conns.append((reader, writer))
    for reader, _ in conns:
        await reader.readline()  # HTTP/1.1 200 OK: admitted, generating
    return conns


async def _timed(conns: list, raw: bytes) -> list[tuple[int, float]]:
    sent = []
    for _, writer in conns:
        writer.write(raw)
        sent.append(time.perf_counter())

    async def finish(i: int) -> tuple[int, float]:
        status, _ = await _read_response(conns[i][0])
        return status, time.perf_counter() - sent[i]

    return await asyncio.gather(*(finish(i) for i in range(len(conns))))


async def _lone(port: int, raw: bytes, n: int) -> list[tuple[int, float]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    for _ in range(n):
        out += await _timed([(reader, writer)], raw)
        await asyncio.sleep(0.02)
    writer.close()
    return out


async def _burst(port: int, raw: bytes, n: int) -> list[tuple[int, float]]:
    conns = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(n)))
    await asyncio.sleep(0.2)  # accepted and idle before the burst
    out = await _timed(conns, raw)
    for _, writer in conns:
        writer.close()
    return out


def _summary(results: list[tuple[int, float]], status: int) -> dict:
    times = sorted(t * 1000 for s, t in results if s == status)
    if not times:
        return {"n": 0}

    def q(p: float) -> float:
        return round(times[min(len(times) - 1, int(p * len(times)))], 1)

    return {
        "n": len(times),
        "of": len(results),
        "p50": round(statistics.median(times), 1),
        "p90": q(0.9),
        "p99": q(0.99),
        "max": round(times[-1], 1),
        "within_50ms": sum(t <= 50 for t in times),
    }


async def _run(port: int, args: argparse.Namespace) -> dict:
    held = await _hold(port, args.cap, args.max_new)
    await asyncio.sleep(1.0)  # the engine is decoding `cap` sequences
    over = _raw("POST", "/generate", {"inputs": "Over the cap", "parameters": {}})
    health = _raw("GET", "/health", None)
    report = {
        "lone_429": _summary(await _lone(port, over, args.lone), 429),
        "lone_health": _summary(await _lone(port, health, args.lone), 200),
        "burst_429": _summary(await _burst(port, over, args.burst), 429),
        "burst_health": _summary(await _burst(port, health, args.burst), 200),
    }
    for _, writer in held:
        writer.close()
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model-id", default=str(TINY))
    ap.add_argument("--port", type=int, default=3931)
    ap.add_argument("--cap", type=int, default=128)
    ap.add_argument("--max-new", type=int, default=400)
    ap.add_argument("--lone", type=int, default=100)
    ap.add_argument("--burst", type=int, default=872)
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)
    if not Path(args.model_id).exists():
        print(f"no model at {args.model_id}: run `make test` once to build the tiny model")
        return 2
    cfg = dict(model=args.model_id, port=args.port, cap=args.cap, max_total=512,
               kv_bytes=64 << 20)  # fmt: skip
    server = Server(cfg)
    try:
        server.wait_ready()
        gc.disable()  # this client's own collections would show up as server latency
        report = asyncio.run(_run(args.port, args))
        gc.enable()
    finally:
        code = server.stop()
    report["exit_code"] = code
    print(f"cap {args.cap} held by generating streams; times from request written to response read")
    print(f"{'':14} {'n':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'<=50ms':>7}")
    for name in ("lone_429", "lone_health", "burst_429", "burst_health"):
        r = report[name]
        if not r["n"]:
            print(f"{name:14} none")
            continue
        print(f"{name:14} {r['n']:>4}/{r['of']:<4} {r['p50']:>8} {r['p90']:>8} {r['p99']:>8} "
              f"{r['max']:>8} {r['within_50ms']:>7}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

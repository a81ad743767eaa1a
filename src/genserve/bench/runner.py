"""Load shapes: closed loop (N clients, each sends its next request when the last one ends) and
open loop (requests arrive as a seeded Poisson process at a fixed rate, whatever the server does).

Every run is bounded twice: by its list of requests and by `duration_s`. When the time limit
comes, requests still in flight are cancelled (the connection is closed, which aborts them on the
server) and counted as `cancelled`, not as errors; the tokens they had received still count
towards output throughput, which is measured over the run's wall-clock window.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from genserve.bench.client import RequestRecord, Target, make_session, send
from genserve.bench.prompts import RequestSpec


@dataclass(frozen=True, slots=True)
class LoadShape:
    concurrency: int | None = None  # closed loop
    rate: float | None = None  # open loop, requests per second (Poisson)
    duration_s: float = 60.0
    seed: int = 0

    def label(self) -> str:
        if self.rate is not None:
            return f"rate={self.rate:g}/s"
        return f"c={self.concurrency}"


@dataclass(slots=True)
class RunOutcome:
    records: list[RequestRecord]
    started: float
    ended: float
    timed_out: bool


class Progress:
    """A tqdm bar on stderr (silent without tqdm or when disabled)."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = None
        self.tokens = 0
        self.t0 = time.perf_counter()
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover
                return
            self.bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, leave=False)

    def done(self, rec: RequestRecord) -> None:
        self.tokens += rec.output_tokens
        if self.bar is not None:
            rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{rate:.1f} tok/s", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def run_load(
    target: Target, specs: Sequence[RequestSpec], shape: LoadShape, progress: Progress
) -> RunOutcome:
    records: list[RequestRecord] = []
    async with make_session(target) as session:
        started = time.perf_counter()
        if shape.rate is not None:
            main = _open_loop(session, target, specs, shape, records, progress)
        else:
            main = _closed_loop(session, target, specs, shape, records, progress)
        task = asyncio.ensure_future(main)
        done, _ = await asyncio.wait({task}, timeout=shape.duration_s)
        timed_out = not done
        if timed_out:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        else:
            task.result()
        ended = time.perf_counter()
    progress.close()
    return RunOutcome(records, started, ended, timed_out)


async def _closed_loop(session, target, specs, shape, records, progress) -> None:
    queue = list(reversed(specs))

    async def client() -> None:
        while queue:
            spec = queue.pop()
            progress.done(await send(session, target, spec, records))

    n = max(1, min(shape.concurrency or 1, len(specs)))
    tasks = [asyncio.ensure_future(client()) for _ in range(n)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _open_loop(session, target, specs, shape, records, progress) -> None:
    rng = np.random.default_rng(shape.seed)
    gaps = rng.exponential(1.0 / float(shape.rate), size=len(specs))
    t0 = time.perf_counter()
    arrivals = np.cumsum(gaps) - gaps[0]  # the first request goes at once
    tasks = []

    async def one(spec: RequestSpec) -> None:
        progress.done(await send(session, target, spec, records))

    try:
        for spec, at in zip(specs, arrivals, strict=True):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(spec)))
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

"""Summary of one run: throughput over the run's window and latency percentiles.

- `output_throughput`: output tokens received during the window (completed requests, plus what
  requests cut off by the time limit had received) / window seconds.
- `request_throughput`: completed requests / window seconds.
- TTFT: request sent -> first token-bearing chunk. ITL: gaps between token-bearing chunks (one
  token per chunk for TGI and llama.cpp; `transformers serve` may put several tokens in one
  chunk). TPOT: (e2e - TTFT) / (output tokens - 1) per request. E2E: sent -> stream end.
  In milliseconds. At high concurrency few long requests finish within the time limit, and
  latencies of only the finished (short) ones would be biased low, so requests cut off by the
  limit count as far as they got: their chunk gaps in ITL, and the time they had waited as a
  lower bound of their TTFT (if no token had come) and of their E2E (see `dist`). TPOT is over
  completed requests.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

from genserve.bench.runner import RunOutcome

PERCENTILES = (50, 90, 99)


def dist(values: Iterable[float | None], censored: Iterable[float] = ()) -> dict[str, Any]:
    """mean/p50/p90/p99 of seconds, reported in milliseconds (None when there is no value).

    `censored` are lower bounds: requests cut off before the event, counted as the time they had
    waited. Leaving them out would report only the lucky requests; counting them at their bound
    makes a statistic that depends on one a lower bound itself: `lower_bounds` names those (the
    tables mark them ">="). A percentile is exact when an uncensored value lies between it and
    the smallest bound, i.e. the values it interpolates between are both uncensored.
    """
    seen = [v for v in values if v is not None]
    bounds = list(censored)
    arr = np.asarray(seen + bounds, dtype=float) * 1000.0
    if arr.size == 0:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    out: dict[str, Any] = {"mean": float(arr.mean())}
    out.update({f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES})
    if bounds:
        low = min(bounds) * 1000.0
        exact = np.asarray(seen, dtype=float) * 1000.0
        out["censored"] = len(bounds)
        out["lower_bounds"] = ["mean"] + [
            f"p{p}" for p in PERCENTILES if not np.any((exact >= out[f"p{p}"]) & (exact < low))
        ]
    return out


def summarize(outcome: RunOutcome) -> dict[str, Any]:
    recs = outcome.records
    window = max(outcome.ended - outcome.started, 1e-9)
    ok = [r for r in recs if r.ok]
    errors = Counter(r.error for r in recs if r.error is not None)
    received = sum(r.output_tokens for r in recs if r.error is None)
    tpots = [
        (r.e2e - r.ttft) / (r.output_tokens - 1)
        for r in ok
        if r.output_tokens > 1 and r.ttft is not None and r.e2e is not None
    ]
    served = [r for r in recs if r.error is None]  # completed, or cut off by the time limit
    itls = [gap for r in served for gap in r.itls]
    cut = [r for r in served if r.cancelled]
    waited = [outcome.ended - r.start for r in cut]
    no_first = [outcome.ended - r.start for r in cut if r.ttft is None]
    return {
        "requests": len(recs),
        "completed": len(ok),
        "cancelled": sum(1 for r in recs if r.cancelled),
        "no_first_token": sum(1 for r in served if r.ttft is None),
        "errors": dict(sorted(errors.items())),
        "timed_out": outcome.timed_out,
        "duration_s": window,
        "request_throughput": len(ok) / window,
        "output_throughput": received / window,
        "output_tokens": received,
        "input_tokens_mean": _mean(r.input_len for r in ok),
        "output_tokens_mean": _mean(r.output_tokens for r in ok),
        "requested_output_mean": _mean(r.requested_output for r in ok),
        "ttft_ms": dist((r.ttft for r in served), censored=no_first),
        "itl_ms": dist(itls),
        "tpot_ms": dist(tpots),
        "e2e_ms": dist((r.e2e for r in ok), censored=waited),
    }


def raw_records(outcome: RunOutcome) -> list[dict[str, Any]]:
    """Every request of a run, compact, with times in seconds from the run's start, so that a
    run's statistics can be recomputed later without running it again."""
    t0 = outcome.started

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - t0, 5)

    return [
        {
            "start": rel(r.start),
            "input_len": r.input_len,
            "asked": r.requested_output,
            "chunks": [rel(t) for t in r.chunk_times],
            "tokens": r.output_tokens,
            "end": rel(r.end),
            "error": r.error,
            "cancelled": r.cancelled,
        }
        for r in outcome.records
    ]


def _mean(values: Iterable[float]) -> float | None:
    vals = list(values)
    return float(np.mean(vals)) if vals else None

"""Summary of one run: throughput over the run's window and latency percentiles.

- `output_throughput`: output tokens received during the window (completed requests, plus what
  requests cut off by the time limit had received) / window seconds.
- `request_throughput`: completed requests / window seconds.
- TTFT: request sent -> first token-bearing chunk. ITL: gaps between token-bearing chunks (one
  token per chunk for TGI and llama.cpp; `transformers serve` may put several tokens in one
  chunk). TPOT: (e2e - TTFT) / (output tokens - 1) per request. E2E: sent -> stream end.
  In milliseconds. E2E and TPOT are over completed requests. TTFT and ITL also count requests
  cut off by the time limit, as far as they got: at high concurrency few long requests finish
  within the limit, and latencies of only the finished (short) ones would be biased low.
  `no_first_token` counts requests cut off before their first token (their TTFT is longer than
  the time they had, and is left out).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

from genserve.bench.runner import RunOutcome

PERCENTILES = (50, 90, 99)


def dist(values: Iterable[float]) -> dict[str, float | None]:
    """mean/p50/p90/p99 of seconds, reported in milliseconds (None when there is no value)."""
    arr = np.asarray([v for v in values if v is not None], dtype=float) * 1000.0
    if arr.size == 0:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    out = {"mean": float(arr.mean())}
    out.update({f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES})
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
        "ttft_ms": dist(r.ttft for r in served),
        "itl_ms": dist(itls),
        "tpot_ms": dist(tpots),
        "e2e_ms": dist(r.e2e for r in ok),
    }


def _mean(values: Iterable[float]) -> float | None:
    vals = list(values)
    return float(np.mean(vals)) if vals else None

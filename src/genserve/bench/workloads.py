"""Named, reproducible workloads. Every request is greedy; prompts are seeded (see `prompts`).

- single: 1 client, 8 requests of 128 in / 128 out.
- sweep: closed loop at 1, 4, 16, 32, 64 clients; ShareGPT-like lengths; max(8, 4c) requests.
- shared-prefix: 16 clients, 32 requests of one 1,000-token system prompt + a distinct
  32-token question, 32 out (`shared`), and the control with a different prefix per request
  (`unique`), so TTFT shared / unique shows the prefix cache.
- overload: 500 clients at once, one 32 in / 32 out request each, against the server's own cap.
- cold-start: process start -> first successful response (`servers.measure_cold_start`).

Each point is also bounded by `duration_s` (default 60 s; overload 120 s). `--quick` shrinks all of
it to a few seconds for CI.
"""

from __future__ import annotations

from dataclasses import dataclass

from genserve.bench.choices import WORKLOADS
from genserve.bench.prompts import (
    PromptBuilder,
    RequestSpec,
    shared_prefix_specs,
    sharegpt_lengths,
    synthetic_specs,
)
from genserve.bench.runner import LoadShape

SWEEP_CONCURRENCY = (1, 4, 16, 32, 64)
COLD_START_RUNS = 3


@dataclass(frozen=True, slots=True)
class RunPlan:
    workload: str
    point: str
    shape: LoadShape
    specs: list[RequestSpec]
    warmup: RequestSpec | None = None  # sent once before the run, not measured


@dataclass(frozen=True, slots=True)
class Scale:
    quick: bool = False
    duration_s: float = 60.0
    seed: int = 0


def plans(name: str, builder_for, scale: Scale) -> list[RunPlan]:
    """The runs of workload `name`; `builder_for(seed)` gives a fresh seeded `PromptBuilder`.

    Each workload (and each sweep level) draws its text from its own seed, so no run re-sends
    an earlier run's prompts and a prefix cache only helps where the workload means it to."""
    makers = {
        "single": _single,
        "sweep": _sweep,
        "shared-prefix": _shared_prefix,
        "overload": _overload,
    }
    if name not in makers:
        raise ValueError(f"unknown workload {name!r} (choose from {', '.join(WORKLOADS)})")
    return makers[name](builder_for, scale)


def _fixed(builder: PromptBuilder, n: int, inp: int, out: int) -> list[RequestSpec]:
    return synthetic_specs(builder, [(inp, out)] * n)


def _single(builder_for, scale: Scale) -> list[RunPlan]:
    n, inp, out = (3, 32, 16) if scale.quick else (8, 128, 128)
    b = builder_for(scale.seed + 1)
    shape = LoadShape(concurrency=1, duration_s=scale.duration_s, seed=scale.seed)
    return [RunPlan("single", "c=1", shape, _fixed(b, n, inp, out), warmup=_fixed(b, 1, inp, 8)[0])]


def _sweep(builder_for, scale: Scale) -> list[RunPlan]:
    levels = (1, 4) if scale.quick else SWEEP_CONCURRENCY
    runs = []
    for c in levels:
        # new text at every level (a prefix cache must not help), same length distribution
        b = builder_for(scale.seed + 100 + c)
        n = 8 if scale.quick else max(8, 4 * c)
        if scale.quick:
            specs = _fixed(b, n, 32, 16)
        else:
            specs = synthetic_specs(b, sharegpt_lengths(n, scale.seed))
        shape = LoadShape(concurrency=c, duration_s=scale.duration_s, seed=scale.seed)
        runs.append(RunPlan("sweep", f"c={c}", shape, specs, warmup=_fixed(b, 1, 16, 4)[0]))
    return runs


def _shared_prefix(builder_for, scale: Scale) -> list[RunPlan]:
    clients, n, prefix, out = (4, 8, 200, 8) if scale.quick else (16, 32, 1000, 32)
    runs = []
    for point, shared in (("unique", False), ("shared", True)):
        b = builder_for(scale.seed + 2)
        # n + 1 prompts: the first is the warm-up, which (when shared) primes the prefix cache
        specs = shared_prefix_specs(b, n + 1, prefix, 32, out, shared=shared)
        shape = LoadShape(concurrency=clients, duration_s=scale.duration_s, seed=scale.seed)
        runs.append(RunPlan("shared-prefix", point, shape, specs[1:], warmup=specs[0]))
    return runs


def _overload(builder_for, scale: Scale) -> list[RunPlan]:
    clients = 40 if scale.quick else 500
    b = builder_for(scale.seed + 3)
    shape = LoadShape(concurrency=clients, duration_s=2 * scale.duration_s, seed=scale.seed)
    specs = _fixed(b, clients, 32, 8 if scale.quick else 32)
    return [RunPlan("overload", f"c={clients}", shape, specs)]


def custom_plan(
    builder: PromptBuilder,
    specs: list[RequestSpec],
    concurrency: int | None,
    rate: float | None,
    scale: Scale,
) -> RunPlan:
    shape = LoadShape(
        concurrency=concurrency, rate=rate, duration_s=scale.duration_s, seed=scale.seed
    )
    return RunPlan("custom", shape.label(), shape, specs, warmup=_fixed(builder, 1, 16, 4)[0])

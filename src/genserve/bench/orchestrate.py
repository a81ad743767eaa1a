"""Run workloads against one server: an existing URL, or a server this process starts and stops.

Results are flat rows (`dict`s) keyed by server, workload and point, so a run against one server
and a comparison of five print and plot the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genserve.bench.client import Target, make_session, send
from genserve.bench.metrics import raw_records, summarize
from genserve.bench.prompts import PromptBuilder
from genserve.bench.report import RAW_KEY
from genserve.bench.runner import Progress, run_load
from genserve.bench.servers import ServerProcess, ServerSpec, measure_cold_start, probe
from genserve.bench.workloads import WORKLOADS, RunPlan, Scale, plans

logger = logging.getLogger(__name__)

SETTLE_S = 2.0  # between runs, so aborted requests of the last run are gone


@dataclass
class BenchConfig:
    workloads: list[str]
    scale: Scale
    builder_for: Callable[[int], PromptBuilder]
    log_dir: Path
    progress: bool = True
    cold_start_runs: int = 3
    extra_plans: list[RunPlan] | None = None  # custom runs (from --concurrency/--rate/--prompts)


def load_plans(cfg: BenchConfig) -> list[RunPlan]:
    names = sorted((w for w in cfg.workloads if w != "cold-start"), key=WORKLOADS.index)
    out = [p for w in names for p in plans(w, cfg.builder_for, cfg.scale)]
    return out + list(cfg.extra_plans or [])


def bench_url(name: str, target: Target, cfg: BenchConfig) -> list[dict[str, Any]]:
    """Workloads against a server someone else started (no cold-start possible)."""
    rows = asyncio.run(run_plans(name, target, load_plans(cfg), cfg.progress))
    if "cold-start" in cfg.workloads:
        rows.append(_skip(name, "cold-start", "needs a server the bench starts (--launch)"))
    return rows


def bench_server(spec: ServerSpec, cfg: BenchConfig) -> list[dict[str, Any]]:
    """Start `spec`, measure its cold start, run the load workloads, stop it."""
    if spec.unavailable:
        logger.warning("skipping %s: %s", spec.name, spec.unavailable)
        return [_skip(spec.name, "*", spec.unavailable)]
    rows: list[dict[str, Any]] = []
    starts: list[float] = []
    todo = load_plans(cfg)
    try:
        if "cold-start" in cfg.workloads and cfg.cold_start_runs > 1:
            starts = measure_cold_start(spec, cfg.log_dir, cfg.cold_start_runs - 1)
        with ServerProcess(spec, cfg.log_dir) as srv:
            assert srv.cold_start_s is not None
            starts.append(srv.cold_start_s)
            logger.info("%s answered %.2f s after start", spec.name, srv.cold_start_s)
            target = Target(srv.base_url, spec.api, spec.model, spec.fixed_length)
            rows += asyncio.run(run_plans(spec.name, target, todo, cfg.progress))
    except Exception as exc:  # one server failing must not lose the others' numbers
        logger.error("%s failed: %s", spec.name, exc)
        done = {(r["workload"], r["point"]) for r in rows}
        rows += [
            _skip(spec.name, p.workload, f"failed: {exc}", p.point)
            for p in todo
            if (p.workload, p.point) not in done
        ]
    if "cold-start" in cfg.workloads:
        rows.append(_cold_row(spec.name, starts))
    return rows


def _cold_row(name: str, starts: list[float]) -> dict[str, Any]:
    if not starts:
        return _skip(name, "cold-start", "server did not start")
    return {
        "server": name,
        "workload": "cold-start",
        "point": f"median of {len(starts)}",
        "cold_start_s": statistics.median(starts),
        "cold_start_runs_s": starts,
    }


def _skip(name: str, workload: str, reason: str, point: str = "") -> dict[str, Any]:
    return {"server": name, "workload": workload, "point": point, "skipped": reason}


async def run_plans(name: str, target: Target, todo: list[RunPlan], progress: bool) -> list[dict]:
    rows = []
    for plan in todo:
        if plan.warmup is not None:
            async with make_session(target) as session:
                await send(session, target, plan.warmup, [])
        desc = f"{name} {plan.workload} {plan.point}"
        bar = Progress(len(plan.specs), desc, progress)
        outcome = await run_load(target, plan.specs, plan.shape, bar)
        row = {
            "server": name,
            "workload": plan.workload,
            "point": plan.point,
            "concurrency": plan.shape.concurrency,
            "rate": plan.shape.rate,
            **summarize(outcome),
            "loadavg_1m_after": os.getloadavg()[0],  # other work on the machine skews numbers
            RAW_KEY: raw_records(outcome),
        }
        logger.info(
            "%s: %.1f out tok/s, %d/%d ok",
            desc,
            row["output_throughput"],
            row["completed"],
            row["requests"],
        )
        rows.append(row)
        await asyncio.sleep(SETTLE_S)
        await _wait_alive(target)
    return rows


async def _wait_alive(target: Target, timeout_s: float = 300.0) -> None:
    """After an overload or a cut-off run, wait until the server answers again."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        ok = await asyncio.to_thread(probe, target.base_url, target.api, target.model, 60.0)
        if ok:
            return
        await asyncio.sleep(1.0)
    raise RuntimeError(f"server at {target.base_url} stopped answering")

"""Tables (Markdown pipe tables, readable in a terminal) and the JSON document."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = dict[str, Any]
RAW_KEY = "_requests"  # per-request records in a row; written to a sidecar file, not the JSON


class LowerBound(float):
    """A statistic that counted cut-off requests at their bound: the true value is >= this."""


# (label, getter, higher is better) for the comparison table, per workload
_TOKS = ("out tok/s", lambda r: r.get("output_throughput"), True)
_REQS = ("req/s", lambda r: r.get("request_throughput"), True)
_OUTLEN = ("out tokens mean (asked)", lambda r: r.get("output_tokens_mean"), None)


def _pct(key: str, p: str, label: str) -> tuple[str, Callable[[Row], Any], bool]:
    return (label, lambda r: stat(r, key, p), False)


def stat(r: Row, key: str, p: str) -> float | None:
    """`r[key][p]`, as a `LowerBound` when cut-off requests make it one."""
    d = r.get(key) or {}
    v = d.get(p)
    return LowerBound(v) if v is not None and p in d.get("lower_bounds", ()) else v


COMPARE_METRICS: dict[str, list[tuple[str, Callable[[Row], Any], bool | None]]] = {
    "single": [
        _TOKS,
        _pct("ttft_ms", "p50", "TTFT p50 ms"),
        _pct("itl_ms", "p50", "ITL p50 ms"),
        _pct("itl_ms", "p99", "ITL p99 ms"),
        _pct("tpot_ms", "mean", "TPOT mean ms"),
        _pct("e2e_ms", "p50", "E2E p50 ms"),
        _OUTLEN,
    ],
    "sweep": [
        _TOKS,
        _REQS,
        _pct("ttft_ms", "p50", "TTFT p50 ms"),
        _pct("ttft_ms", "p99", "TTFT p99 ms"),
        _pct("itl_ms", "p50", "ITL p50 ms"),
        _pct("itl_ms", "p99", "ITL p99 ms"),
        _pct("tpot_ms", "mean", "TPOT mean ms"),
        _OUTLEN,
    ],
    "shared-prefix": [
        _pct("ttft_ms", "p50", "TTFT p50 ms"),
        _pct("ttft_ms", "p90", "TTFT p90 ms"),
        _TOKS,
    ],
    "overload": [
        ("completed", lambda r: r.get("completed"), None),
        ("errors", lambda r: _errors(r), None),
        _TOKS,
        _pct("ttft_ms", "p99", "TTFT p99 ms"),
        _pct("e2e_ms", "p99", "E2E p99 ms"),
    ],
    "cold-start": [("seconds to first response", lambda r: r.get("cold_start_s"), False)],
}
COMPARE_METRICS["custom"] = COMPARE_METRICS["sweep"]


def _errors(r: Row) -> str:
    errs = r.get("errors") or {}
    return ", ".join(f"{k}:{v}" for k, v in errs.items()) or "0"


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        text = f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return (">=" + text) if isinstance(v, LowerBound) else text
    return str(v)


def _md(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def run_table(rows: list[Row]) -> str:
    """One line per run, every metric: the view for a single server."""
    header = ["server", "workload", "point", "ok/sent", "req/s", "out tok/s", "TTFT p50/p90/p99 ms"]
    header += ["ITL p50/p90/p99 ms", "E2E p50/p90/p99 ms", "out tok mean (asked)", "errors"]
    lines = []
    for r in rows:
        head = [r["server"], r["workload"], r.get("point", "")]
        if "skipped" in r:
            lines.append(head + [f"skipped: {r['skipped']}"] + [""] * (len(header) - 4))
        elif r["workload"] == "cold-start":
            runs = ", ".join(f"{t:.2f}" for t in r["cold_start_runs_s"])
            cells = [f"{r['cold_start_s']:.2f} s to first response (runs: {runs})"]
            lines.append(head + cells + [""] * (len(header) - 4))
        else:
            lines.append(head + _run_cells(r))
    return _md(header, lines)


def _run_cells(r: Row) -> list[str]:
    def three(key: str) -> str:
        return "/".join(fmt(stat(r, key, p)) for p in ("p50", "p90", "p99"))

    asked = f"{fmt(r.get('output_tokens_mean'))} ({fmt(r.get('requested_output_mean'))})"
    cut = f" (+{r['cancelled']} cut off" if r.get("cancelled") else ""
    if cut and r.get("no_first_token"):
        cut += f", {r['no_first_token']} before a first token"
    cut += ")" if cut else ""
    return [
        f"{r['completed']}/{r['requests']}{cut}",
        fmt(r["request_throughput"]),
        fmt(r["output_throughput"]),
        three("ttft_ms"),
        three("itl_ms"),
        three("e2e_ms"),
        asked,
        _errors(r),
    ]


def compare_table(rows: list[Row], servers: list[str]) -> str:
    """One table: a line per workload point and metric, a column per server, and
    genserve (its best row) / the best other server."""
    ours = [s for s in servers if s.startswith("genserve")]
    peers = [s for s in servers if not s.startswith("genserve")]
    header = ["workload", "point", "metric", *servers, "genserve / best peer"]
    index = {(r["server"], r["workload"], r.get("point", "")): r for r in rows}
    points: list[tuple[str, str]] = []
    for r in rows:
        key = (r["workload"], r.get("point", ""))
        if r["workload"] != "*" and "skipped" not in r and key not in points:
            points.append(key)
    lines = []
    for workload, point in points:
        for label, get, higher in COMPARE_METRICS.get(workload, COMPARE_METRICS["sweep"]):
            vals = {s: _value(index.get((s, workload, point)), get) for s in servers}
            ratio = _ratio(vals, ours, peers, higher)
            lines.append([workload, point, label, *(fmt(vals[s]) for s in servers), ratio])
    lines += _prefix_effect(index, servers)
    notes = [f"- {s}: skipped: {r['skipped']}" for (s, w, _), r in index.items() if "skipped" in r]
    return _md(header, lines) + ("\n" + "\n".join(notes) if notes else "")


def _value(r: Row | None, get: Callable[[Row], Any]) -> Any:
    if r is None or "skipped" in r:
        return None
    return get(r)


def _ratio(vals: dict[str, Any], ours: list[str], peers: list[str], higher: bool | None) -> str:
    if higher is None:
        return ""
    pick = max if higher else min
    mine = {s: vals[s] for s in ours if isinstance(vals[s], int | float)}
    theirs = {s: vals[s] for s in peers if isinstance(vals[s], int | float)}
    if not mine or not theirs:
        return "-"
    s_mine = pick(mine, key=mine.__getitem__)
    s_peer = pick(theirs, key=theirs.__getitem__)
    if not theirs[s_peer]:
        return "-"
    arrow = "higher better" if higher else "lower better"
    bound = isinstance(mine[s_mine], LowerBound) or isinstance(theirs[s_peer], LowerBound)
    note = ", a bound involved" if bound else ""
    return f"{mine[s_mine] / theirs[s_peer]:.2f}x ({s_mine} vs {s_peer}; {arrow}{note})"


def _prefix_effect(index: dict, servers: list[str]) -> list[list[str]]:
    """TTFT p50 with a shared prefix / with distinct prefixes (the prefix cache's effect)."""
    cells, seen = [], False
    for s in servers:
        a, b = index.get((s, "shared-prefix", "shared")), index.get((s, "shared-prefix", "unique"))
        va = _value(a, lambda r: r["ttft_ms"]["p50"])
        vb = _value(b, lambda r: r["ttft_ms"]["p50"])
        seen = seen or a is not None
        cells.append(f"{va / vb:.2f}" if va is not None and vb else "-")
    if not seen:
        return []
    return [["shared-prefix", "shared/unique", "TTFT p50 ratio", *cells, ""]]


def write_json(path: str | Path, rows: list[Row], servers: dict[str, str], meta: dict) -> Path:
    """The summary document at `path`; every request of every run, one JSON line per run, in
    `<path stem>.requests.jsonl` beside it. Returns the sidecar's path."""
    path = Path(path)
    summary = [{k: v for k, v in r.items() if k != RAW_KEY} for r in rows]
    doc = {"meta": {**machine_info(), **meta}, "servers": servers, "rows": summary}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    sidecar = path.with_name(path.stem + ".requests.jsonl")
    with open(sidecar, "w") as f:
        for r in rows:
            if RAW_KEY in r:
                key = {k: r[k] for k in ("server", "workload", "point", "duration_s")}
                f.write(json.dumps({**key, "requests": r[RAW_KEY]}) + "\n")
    return sidecar


def machine_info() -> dict[str, Any]:
    from genserve.bench.machine import cpu_info

    return {
        **cpu_info(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_end": os.getloadavg(),
    }

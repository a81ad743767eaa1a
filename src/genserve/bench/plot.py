"""`--plot out.png`: throughput vs concurrency, TTFT and ITL percentiles, shared-prefix TTFT.

Four panels, one line (or bar group) per server:
1. output tokens/s vs concurrency (sweep or custom closed-loop runs; request rate for open loop);
2. TTFT p50 (solid) and p99 (dashed) vs concurrency, log scale; hollow markers are lower bounds
   (requests cut off by the time limit before their first token, see `metrics.dist`);
3. ITL p50 (solid) and p99 (dashed) vs concurrency, log scale;
4. shared-prefix TTFT p50, distinct vs shared prefix, as bars (hatched: a lower bound); cold
   start as text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from genserve.bench.report import LowerBound, stat

Row = dict[str, Any]


def _series(rows: list[Row], server: str) -> list[tuple[float, Row]]:
    pts = []
    for r in rows:
        if r["server"] != server or r["workload"] not in ("sweep", "custom") or "skipped" in r:
            continue
        x = r.get("concurrency") or r.get("rate")
        if x is not None:
            pts.append((float(x), r))
    return sorted(pts, key=lambda p: p[0])


def plot(rows: list[Row], servers: list[str], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    # minor ticks of a log axis: label only 2x and 5x a power of ten, so decades stay readable
    minor = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "25" else "")

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (ax_tok, ax_ttft), (ax_itl, ax_bar) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, server in enumerate(servers):
        pts = _series(rows, server)
        if not pts:
            continue
        c = colors[i % len(colors)]
        xs = [x for x, _ in pts]
        ax_tok.plot(xs, [r["output_throughput"] for _, r in pts], "o-", color=c, label=server)
        for ax, key in ((ax_ttft, "ttft_ms"), (ax_itl, "itl_ms")):
            _line(ax, pts, key, "p50", "-", c, label=server)
            _line(ax, pts, key, "p99", "--", c, label=None)
    for ax, ylabel, name in (
        (ax_tok, "output tokens/s", "Throughput vs concurrency"),
        (ax_ttft, "TTFT ms (log)", "TTFT: p50 solid, p99 dashed; hollow = lower bound"),
        (ax_itl, "ITL ms (log)", "Inter-token latency: p50 solid, p99 dashed"),
    ):
        ax.set_xscale("log", base=2)
        if ax is not ax_tok:
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(minor)
        ax.xaxis.set_major_formatter(plain)
        ax.yaxis.set_major_formatter(plain)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    _bars(ax_bar, rows, servers)
    fig.suptitle(title or "genserve bench")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _line(ax, pts: list[tuple[float, Row]], key: str, p: str, style: str, c: str, label) -> None:
    """One percentile vs concurrency; hollow markers where cut-off requests make it a bound."""
    xs = [x for x, r in pts if stat(r, key, p) is not None]
    ys = [stat(r, key, p) for _, r in pts if stat(r, key, p) is not None]
    ax.plot(xs, ys, style, color=c, label=label)
    for x, y in zip(xs, ys, strict=True):
        face = "none" if isinstance(y, LowerBound) else c
        ax.plot([x], [y], "o", color=c, markerfacecolor=face, markersize=5)


def _bars(ax, rows: list[Row], servers: list[str]) -> None:
    """Grouped bars of shared-prefix TTFT p50 (distinct vs shared prefix); cold start as text."""
    index = {
        (r["server"], r["workload"], r.get("point", "")): r for r in rows if "skipped" not in r
    }
    points = (("unique", "distinct prefixes"), ("shared", "shared prefix"))
    width = 0.8 / max(len(servers), 1)
    drawn = False
    for i, server in enumerate(servers):
        vals = [_get(index, server, "shared-prefix", p) for p, _ in points]
        if any(v is not None for v in vals):
            xs = [g + i * width for g in range(len(points))]
            bars = ax.bar(xs, [v or 0.0 for v in vals], width=width, label=server)
            for bar, v in zip(bars, vals, strict=True):
                if isinstance(v, LowerBound):
                    bar.set_hatch("//")  # at least this long: requests were cut off waiting
            drawn = True
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(points))])
    ax.set_xticklabels([f"TTFT p50, {name}" for _, name in points], fontsize=8)
    ax.set_ylabel("ms")
    ax.set_title("Shared-prefix TTFT p50 (lower is better; hatched = lower bound)")
    ax.grid(True, axis="y", alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, loc="upper right")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.4)  # room for the cold-start box
    cold = [(s, _cold(index, s)) for s in servers]
    text = "\n".join(f"{s}: {v:.2f} s" for s, v in cold if v is not None)
    if not drawn and not text:
        ax.axis("off")  # neither workload ran
    if text:
        ax.text(0.02, 0.97, "cold start (to first response)\n" + text, transform=ax.transAxes,
                va="top", fontsize=8, family="monospace",
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})  # fmt: skip


def _get(index: dict, server: str, workload: str, point: str) -> float | None:
    r = index.get((server, workload, point))
    return stat(r, "ttft_ms", "p50") if r else None


def _cold(index: dict, server: str) -> float | None:
    for (s, w, _), r in index.items():
        if s == server and w == "cold-start":
            return r.get("cold_start_s")
    return None

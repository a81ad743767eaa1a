"""Reliability soak (issue 8; not in CI). Three phases against one `genserve` server process:

1. soak: `--requests` (10,000) from `--clients` (64) closed-loop clients over every generating
   route, `--disconnect` (20%) of them abandoned at a random point. Passes with 0 leaked KV
   blocks, 0 5xx, and the server's RSS at the end within 5% of its RSS after warm-up.
2. burst: `--burst` (1,000) connections opened at once, then one request on each, against a
   concurrency cap of 128: 872 get 429 at once, 128 complete, the server is healthy after.
3. fuzz: `--fuzz` (>= 2,000) schemathesis cases against our OpenAPI document and as many
   against TGI's (`shared/reference/tgi-openapi.json`): 0 5xx.

The server runs in a child process with a control pipe, so the soak can ask it, when idle,
for the scheduler's integrity check and its KV block counts.

    python bench/soak.py                      # the tiny test model (built by `make test`)
    python bench/soak.py --requests 2000 --fuzz 500 --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from soak_load import burst, fuzz, soak  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / ".cache" / "test-assets" / "tiny-llama"
TGI_SPEC = REPO.parent / "shared" / "reference" / "tgi-openapi.json"


def _child(conn: Any, cfg: dict) -> None:
    """The server process: engine + app + `GracefulServer`, and a thread serving `conn`."""
    import logging
    import threading

    from genserve.config import CacheConfig
    from genserve.engine.async_engine import AsyncEngine
    from genserve.server.app import build_app
    from genserve.server.launcher import setup_logging
    from genserve.server.lifecycle import GracefulServer, uvicorn_config
    from genserve.server.settings import ServerSettings

    setup_logging(False)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)  # 10,000s of lines otherwise
    cache = CacheConfig(memory_bytes=cfg["kv_bytes"])
    engine = AsyncEngine.from_model(cfg["model"], dtype="float32", cache_config=cache)
    settings = ServerSettings(
        model_id="tiny",
        max_input_tokens=cfg["max_total"] - 1,
        max_total_tokens=cfg["max_total"],
        max_concurrent_requests=cfg["cap"],
        max_queued_tokens=None,
    )
    app = build_app(engine, settings)
    config = uvicorn_config(app, "127.0.0.1", cfg["port"], log_config=None, backlog=4096)
    server = GracefulServer(config, app.state.lifecycle)
    threading.Thread(target=_control, args=(conn, app, engine), daemon=True).start()
    server.run()


def _control(conn: Any, app: Any, engine: Any) -> None:
    import gc

    while True:
        try:
            command = conn.recv()
        except EOFError:
            return
        if command == "stats":
            gc.collect()
            conn.send(_stats(app, engine))


def _stats(app: Any, engine: Any, timeout: float = 60.0) -> dict:
    """Wait for the engine to be idle, then look (the engine thread cannot step meanwhile)."""
    deadline = time.monotonic() + timeout
    inner = engine.engine
    while engine.num_live or inner.has_unfinished() or engine._inbox or engine._aborts:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    with engine._cond:
        try:
            inner.scheduler.check_integrity()
            integrity = "ok"
        except AssertionError as exc:
            integrity = f"FAILED: {exc}"
        bm = inner.block_manager
        return {
            "integrity": integrity,
            "used_blocks": bm.num_used_blocks,
            "free_blocks": bm.num_free_blocks,
            "usable_blocks": bm.num_usable_blocks,
            "engine_live": len(inner._live),
            "permits_in_use": app.state.service.permits.in_use,
            "permits_reserved": app.state.service.permits.reserved,
            "queued_tokens": app.state.service.queued_tokens.queued,
            "inflight": app.state.lifecycle.inflight,
        }


class Server:
    def __init__(self, cfg: dict) -> None:
        import psutil

        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(child_conn, cfg), daemon=True)
        self.proc.start()
        self.ps = psutil.Process(self.proc.pid)
        self.url = f"http://127.0.0.1:{cfg['port']}"

    def wait_ready(self, timeout: float = 300) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("server not ready")

    def stats(self) -> dict:
        self.conn.send("stats")
        out = self.conn.recv()
        out["rss_mb"] = round(self.ps.memory_info().rss / 2**20, 1)
        return out

    def stop(self) -> int | None:
        import signal

        self.ps.send_signal(signal.SIGTERM)  # drains, then exits 0
        self.proc.join(120)
        return self.proc.exitcode


def _clean(stats: dict) -> bool:
    return (
        stats["integrity"] == "ok"
        and stats["used_blocks"] == 0
        and not any(
            stats[k]
            for k in (
                "engine_live",
                "permits_in_use",
                "permits_reserved",
                "queued_tokens",
                "inflight",
            )
        )
    )


def _checks(report: dict, args: Any) -> dict[str, bool]:
    checks = {}
    for i in (0, 1):
        if f"exit_code_{i}" in report:
            ok = _clean(report[f"final_stats_{i}"]) and report[f"exit_code_{i}"] == 0
            checks[f"server {i}: clean at the end, SIGTERM -> exit 0"] = ok
    if "soak" in report:
        s = report["soak"]
        checks["soak: 0 leaked blocks, integrity ok"] = _clean(s["stats_after"])
        checks["soak: 0 5xx"] = s["http_5xx"] == 0 and s["transport_errors"] == 0
        checks["soak: RSS within 5% of after warm-up"] = abs(s["rss_growth_pct"]) <= 5.0
    if "burst" in report:
        b = report["burst"]
        checks[f"burst: {b['expected_429']} x 429, {args.cap} complete"] = b["exact"]
        checks["burst: healthy after"] = b["healthy_after"] and _clean(b["stats_after"])
    if "fuzz" in report:
        f = report["fuzz"]
        checks["fuzz: 0 5xx"] = all(f[k]["http_5xx"] == 0 for k in ("ours", "tgi"))
        checks["fuzz: >= requested cases"] = all(
            f[k]["cases"] >= args.fuzz for k in ("ours", "tgi")
        )
    return checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model-id", default=str(TINY))
    ap.add_argument("--port", type=int, default=3917)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--warmup", type=int, default=1_000)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--disconnect", type=float, default=0.2)
    ap.add_argument("--burst", type=int, default=1_000)
    ap.add_argument("--cap", type=int, default=128)
    ap.add_argument("--fuzz", type=int, default=2_000, help="schemathesis cases per document")
    ap.add_argument("--tgi-spec", default=str(TGI_SPEC))
    ap.add_argument("--seed", type=int, default=8)
    ap.add_argument("--phases", default="soak,burst,fuzz", help="which phases to run")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)
    if not Path(args.model_id).exists():
        print(f"no model at {args.model_id}: run `make test` once to build the tiny model")
        return 2
    report: dict[str, Any] = {"config": dict(vars(args))}
    phases = args.phases.split(",")
    # soak and burst: 512-token requests; fuzz: a fresh server with short generations, so
    # thousands of schema-valid cases (any max_new_tokens) run in minutes
    runs = [(("soak", soak), ("burst", burst)), (("fuzz", fuzz),)]
    for i, (run, max_total) in enumerate(zip(runs, (512, 64), strict=True)):
        run = tuple((name, phase) for name, phase in run if name in phases)
        if not run:
            continue
        cfg = dict(model=args.model_id, port=args.port + i, cap=args.cap, max_total=max_total,
                   kv_bytes=64 << 20)  # fmt: skip
        server = Server(cfg)
        try:
            server.wait_ready()
            for name, phase in run:
                report[name] = phase(server, args)
            report[f"final_stats_{i}"] = server.stats()
        finally:
            report[f"exit_code_{i}"] = server.stop()
    checks = _checks(report, args)
    report["checks"] = checks
    ok = True
    print(json.dumps({k: v for k, v in report.items() if k != "fuzz"}, indent=2, default=str))
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}  {name}")
        ok &= passed
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

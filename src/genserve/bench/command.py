"""What `genserve bench` does once its arguments are parsed: pick the servers, build the runs,
run them, print the tables, write the JSON and the PNG."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import tempfile
from pathlib import Path
from typing import Any

from genserve.bench import llamacpp, peers, report
from genserve.bench.client import Target
from genserve.bench.machine import cpu_line
from genserve.bench.orchestrate import BenchConfig, bench_server, bench_url
from genserve.bench.prompts import PromptBuilder, jsonl_specs, sharegpt_lengths, synthetic_specs
from genserve.bench.workloads import WORKLOADS, Scale, custom_plan
from genserve.kernels.cpu import cpu_flags

logger = logging.getLogger("genserve.bench")


def run_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # SIGTERM (and SIGINT, even where a background shell ignores it) unwinds the stack, so every
    # server this run started is stopped by its context manager rather than left behind
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupted)
    if args.from_json:
        return _from_json(args)
    scale = _scale(args)
    workloads = _workloads(args)
    tok = _tokenizer(args)
    builder_for = lambda seed: PromptBuilder(tok, seed)  # noqa: E731
    if not builder_for(0).exact:
        logger.warning("no tokenizer: prompt lengths are estimates (one token per word)")
    cfg = BenchConfig(
        workloads=[w for w in workloads if w != "custom"],
        scale=scale,
        builder_for=builder_for,
        log_dir=Path(args.log_dir or tempfile.mkdtemp(prefix="genserve-bench-")),
        progress=not args.no_progress,
        cold_start_runs=1 if args.quick else args.cold_start_runs,
        extra_plans=_custom_plans(args, builder_for, scale) if "custom" in workloads else None,
    )
    rows, servers = _execute(args, cfg)
    names = list(servers)
    print(cpu_line())  # the machine and genserve's kernel set beside the numbers
    print(report.run_table(rows))
    if args.compare or len(names) > 1:
        print()
        print(report.compare_table(rows, names))
    meta = {
        "args": vars(args),
        "workloads": workloads,
        "tokenizer": str(tok) if tok else None,
        "exact_prompt_lengths": builder_for(0).exact,
    }
    if args.json:
        report.write_json(args.json, rows, servers, meta)
        logger.info("wrote %s", args.json)
    if args.plot:
        from genserve.bench.plot import plot

        plot(rows, names, args.plot, title=f"genserve bench: {', '.join(workloads)}")
        logger.info("wrote %s", args.plot)
    return 0


def _from_json(args: argparse.Namespace) -> int:
    doc = json.loads(Path(args.from_json).read_text())
    rows, names = doc["rows"], list(doc["servers"])
    if "cpu_model" in doc["meta"]:  # files written before the CPU was recorded lack it
        print(cpu_line(doc["meta"]))
    print(report.run_table(rows))
    if len(names) > 1:
        print()
        print(report.compare_table(rows, names))
    if args.plot:
        from genserve.bench.plot import plot

        plot(rows, names, args.plot, title=f"genserve bench: {', '.join(doc['meta']['workloads'])}")
    return 0


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _execute(args: argparse.Namespace, cfg: BenchConfig) -> tuple[list[dict], dict[str, str]]:
    if args.url:
        fixed = args.fixed_length or ("none" if args.api == "tgi" else "ignore_eos")
        target = Target(args.url.rstrip("/"), args.api, args.model, fixed)
        return bench_url("server", target, cfg), {"server": f"{args.url} ({args.api})"}
    if args.compare:
        cache = llamacpp.bench_cache(Path(args.cache_dir) if args.cache_dir else None)
        isa = args.llamacpp_isa or llamacpp.default_isa(cpu_flags())
        if args.build_peers:
            llamacpp.build_llama_server(cache, isa)
        names = [n.strip() for n in args.compare.split(",") if n.strip()]
        threads = args.threads or peers.DEFAULT_THREADS
        specs = peers.peer_specs(names, cache, threads, isa)
    else:  # --launch or --quick
        dtype = args.dtype or ("float32" if args.quick else "bfloat16")
        specs = [peers.genserve_spec(dtype, args.model_id, args.threads)]
    rows: list[dict[str, Any]] = []
    for spec in specs:
        rows += bench_server(spec, cfg)
    return rows, {s.name: s.unavailable or s.description for s in specs}


def _scale(args: argparse.Namespace) -> Scale:
    default = 20.0 if args.quick else 60.0
    return Scale(quick=args.quick, duration_s=args.duration or default, seed=args.seed)


def _workloads(args: argparse.Namespace) -> list[str]:
    if args.workload:
        names = [w.strip() for w in args.workload.split(",") if w.strip()]
    elif args.quick:
        names = ["single", "sweep", "shared-prefix", "cold-start"]
    elif args.concurrency or args.rate or args.prompts:
        names = []
    else:
        names = ["single"]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    if args.concurrency or args.rate or args.prompts:
        names.append("custom")
    return names


def _custom_plans(args: argparse.Namespace, builder_for, scale: Scale) -> list:
    levels = [("c", int(c)) for c in (args.concurrency or "").split(",") if c.strip()]
    levels += [("r", float(r)) for r in (args.rate or "").split(",") if r.strip()]
    plans = []
    for i, (kind, value) in enumerate(levels or [("c", 1)]):
        b = builder_for(args.seed + 1000 + i)  # new synthetic text per level, as in `sweep`
        specs = _custom_specs(args, b)
        conc, rate = (value, None) if kind == "c" else (None, value)
        plans.append(custom_plan(b, specs, conc, rate, scale))
    return plans


def _custom_specs(args: argparse.Namespace, b: PromptBuilder) -> list:
    out_default = args.output_len or 128
    if args.prompts:  # the user's prompts, the same at every level
        return jsonl_specs(args.prompts, b, out_default)[: args.num_requests]
    if args.input_len or args.output_len:
        return synthetic_specs(b, [(args.input_len or 128, out_default)] * args.num_requests)
    return synthetic_specs(b, sharegpt_lengths(args.num_requests, args.seed))


def _tokenizer(args: argparse.Namespace) -> Path | None:
    """The tokenizer used to size prompts: --tokenizer, the --model-id dir's, else SmolLM2's."""
    if args.tokenizer:
        return Path(args.tokenizer)
    if args.model_id and (Path(args.model_id) / "tokenizer.json").is_file():
        return Path(args.model_id) / "tokenizer.json"
    try:
        from genserve.models.default_model import default_model_dir

        path = default_model_dir() / "tokenizer.json"
        return path if path.is_file() else None
    except Exception as exc:  # no default model installed: estimated lengths
        logger.warning("default tokenizer unavailable (%s)", exc)
        return None

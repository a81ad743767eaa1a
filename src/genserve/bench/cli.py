"""`genserve bench`: the load generator's command line.

genserve bench --url http://127.0.0.1:3000 --workload single,sweep
genserve bench --launch --dtype float32 --workload cold-start,shared-prefix
genserve bench --compare --build-peers --workload single,sweep,shared-prefix,cold-start
genserve bench --url URL --api openai-completions --concurrency 8 --rate 2 --prompts p.jsonl
genserve bench --quick --model-id DIR       # a few seconds; what CI runs
"""

from __future__ import annotations

import argparse
import logging
import sys

from genserve.bench.choices import APIS, FIXED_LENGTH_MODES, LLAMACPP_ISAS, PEERS, WORKLOADS

# Everything else (aiohttp, numpy, the peers) is imported in `run`, so that building the
# `genserve` parser for `launch` never needs the bench extra.

logger = logging.getLogger("genserve.bench")


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", help="an already running server (TGI or OpenAI API)")
    where.add_argument("--launch", action="store_true", help="start `genserve launch` and bench it")
    where.add_argument(
        "--compare",
        nargs="?",
        const=",".join(PEERS),
        help=f"start each peer in turn, same weights (default: {','.join(PEERS)})",
    )
    where.add_argument("--quick", action="store_true", help="a few seconds against --model-id (CI)")
    where.add_argument("--from-json", help="no run: print the tables (and --plot) of a --json file")
    p.add_argument("--api", choices=APIS, default="tgi", help="API of --url")
    p.add_argument("--model", default="tgi", help="OpenAI `model` field for --url")
    p.add_argument(
        "--fixed-length",
        choices=FIXED_LENGTH_MODES,
        default=None,
        help="how --url is asked for exact output lengths (default: ignore_eos, none for TGI)",
    )
    p.add_argument("--workload", default=None, help=f"comma-separated: {', '.join(WORKLOADS)}")
    p.add_argument("--concurrency", default=None, help="custom closed-loop run(s), e.g. 1,8")
    p.add_argument(
        "--rate", default=None, help="custom open-loop (Poisson) run(s), req/s, e.g. 2,4"
    )
    p.add_argument("--num-requests", type=int, default=64, help="requests per custom run")
    p.add_argument("--prompts", default=None, help="JSONL prompts for custom runs")
    p.add_argument("--input-len", type=int, default=None, help="fixed input length (custom runs)")
    p.add_argument("--output-len", type=int, default=None, help="fixed output length (custom runs)")
    p.add_argument(
        "--duration", type=float, default=None, help="time limit per run, s (default 60)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer.json or its dir (default: SmolLM2's)"
    )
    p.add_argument("--model-id", default=None, help="for --launch/--quick: model genserve serves")
    p.add_argument("--dtype", default=None, help="for --launch/--quick: genserve's --dtype")
    p.add_argument("--cold-start-runs", type=int, default=3)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for every server started (OMP_NUM_THREADS, llama.cpp -t; default 2)",
    )
    p.add_argument(
        "--build-peers", action="store_true", help="build llama-server if missing (~15 min)"
    )
    p.add_argument(
        "--llamacpp-isa",
        choices=LLAMACPP_ISAS,
        default=None,
        help="llama.cpp build variant for the llama.cpp peers (default: native; avx512 on AMX "
        "CPUs, where the native build crashes on quantized weights)",
    )
    p.add_argument(
        "--cache-dir", default=None, help="llama.cpp build + GGUFs (default <genserve cache>/bench)"
    )
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--plot", default=None, help="write a PNG here (needs matplotlib)")
    p.add_argument("--log-dir", default=None, help="server logs (default: a temp dir)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from genserve.bench.command import run_command

    return run_command(args)


def main(argv: list[str] | None = None) -> int:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="genserve bench", description=__doc__, formatter_class=raw
    )
    add_bench_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

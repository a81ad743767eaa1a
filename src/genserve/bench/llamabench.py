"""llama.cpp's own `llama-bench` on a GGUF: 512-token prefill (pp512) and 128-token decode (tg128),
the numbers the issue's targets name. Its JSON (`-o json`) is parsed here; a crash (e.g. a
signal) becomes a row that says so, so the other rows still print."""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
from pathlib import Path
from typing import Any

PROMPT, GEN = 512, 128


def command(binary: Path, gguf: Path, threads: int, reps: int = 5) -> list[str]:
    cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-p", str(PROMPT), "-n", str(GEN)]
    return cmd + ["-r", str(reps), "-o", "json"]


def _tok_s(test: dict[str, Any]) -> float:
    """The median of the repetitions (as bench/model_step.py's own median), else llama-bench's
    mean."""
    samples = test.get("samples_ts") or []
    return statistics.median(samples) if samples else float(test["avg_ts"])


def parse(stdout: str) -> dict[str, Any]:
    """llama-bench's JSON list -> {prefill_tok_s, decode_tok_s, build, ...}."""
    tests = json.loads(stdout[stdout.index("[") :])
    out: dict[str, Any] = {}
    for t in tests:
        if t.get("n_prompt") and not t.get("n_gen"):
            out["prefill_tok_s"] = _tok_s(t)
        elif t.get("n_gen") and not t.get("n_prompt"):
            out["decode_tok_s"] = _tok_s(t)
    if tests:
        first = tests[0]
        out["build"] = f"{first.get('build_number', '?')} ({first.get('build_commit', '?')})"
        out["model_type"] = first.get("model_type")
        out["cpu_info"] = first.get("cpu_info")
        out["threads"] = first.get("n_threads")
    return out


def failure(returncode: int, stderr: str) -> str:
    """What a failed run says in the table: the signal's name where it was killed by one."""
    if returncode < 0:
        try:
            what = f"crashed ({signal.Signals(-returncode).name})"
        except ValueError:
            what = f"crashed (signal {-returncode})"
    else:
        what = f"exit {returncode}"
    tail = stderr.strip().splitlines()[-1:] or [""]
    return f"{what}: {tail[0][:200]}" if tail[0] else what


def run(binary: Path, gguf: Path, threads: int, reps: int = 5) -> dict[str, Any]:
    proc = subprocess.run(command(binary, gguf, threads, reps), capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": failure(proc.returncode, proc.stderr)}
    return parse(proc.stdout)

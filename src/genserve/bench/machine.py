"""The machine beside every number: the CPU model, the flags that decide which kernels can run
(genserve's and llama.cpp's), and the genserve kernel set in use.

`--kernels SET` (bench/model_step.py, bench/engine_throughput.py) goes through `kernels_env`:
besides `GENSERVE_KERNELS` it limits PyTorch itself to AVX2 for `avx2-fma`, so whatever still runs
as PyTorch ops measures an AVX2 CPU rather than this one's AVX-512/AMX paths.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from genserve.kernels.cpu import cpu_flags, cpu_model, kernel_set

# the /proc/cpuinfo flags that pick a kernel path, in genserve or in llama.cpp (ggml)
RELEVANT_FLAGS = (
    "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512vbmi",
    "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
)  # fmt: skip

# What PyTorch may use under each kernel set: ATen's own vector code, oneDNN's and MKL's (its
# fp32 sgemm, which transformers' float32 matmuls run on).
TORCH_ISA = {
    "avx2-fma": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    }
}


def relevant_flags(flags: Iterable[str]) -> list[str]:
    have = set(flags)
    return [f for f in RELEVANT_FLAGS if f in have]


def kernel_set_text() -> str:
    """`kernel_set()` as text; a bad GENSERVE_KERNELS becomes the error instead of a crash."""
    try:
        return str(kernel_set())
    except ValueError as exc:
        return f"invalid: {exc}"


def cpu_info() -> dict[str, Any]:
    """For the JSON outputs."""
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": relevant_flags(cpu_flags()),
        "genserve_kernels": kernel_set_text(),
        "torch_isa": {
            k: os.environ[k]
            for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
            if k in os.environ
        },  # fmt: skip
    }


def cpu_line(info: Mapping[str, Any] | None = None) -> str:
    """One line for the top of every table."""
    info = info or cpu_info()
    line = f"CPU {info['cpu_model']}; flags {' '.join(info['cpu_flags']) or '-'}; "
    line += f"genserve kernels {info['genserve_kernels']}"
    if info.get("torch_isa"):
        line += "; PyTorch limited to " + ", ".join(
            f"{k}={v}" for k, v in info["torch_isa"].items()
        )
    return line


def kernels_env(name: str) -> dict[str, str]:
    """The environment that runs genserve on kernel set `name` (see the module docstring)."""
    return {"GENSERVE_KERNELS": name, **TORCH_ISA.get(name, {})}


def reexec_with_kernels(name: str | None) -> None:
    """Re-runs this script with `kernels_env(name)` unless it is already in place: PyTorch reads
    its ISA limits when it is imported, before any argument is parsed."""
    if not name or os.environ.get("GENSERVE_KERNELS") == name:
        return
    env = kernels_env(name)
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})


def default_kernel_sets(supported: list[str]) -> list[str]:
    """The kernel sets to compare by default: the best this CPU runs, and the AVX2 baseline
    (every x86-64-v3 CPU's) where that is another."""
    out = supported[:1]
    if "avx2-fma" in supported and "avx2-fma" not in out:
        out.append("avx2-fma")
    return out or ["torch"]

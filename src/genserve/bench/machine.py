"""The machine beside every number: the CPU model, the flags that decide which kernels can run
(genserve's and llama.cpp's), and the genserve kernel set in use.

`--kernels SET` (bench/model_step.py, bench/engine_throughput.py) goes through `kernels_env`:
besides `GENSERVE_KERNELS` it limits PyTorch itself to AVX2 for `avx2-fma`, so whatever still runs
as PyTorch ops measures an AVX2 CPU rather than this one's AVX-512/AMX paths. A genserve whose
kernel loaders do not yet read `GENSERVE_KERNELS` would run its AVX-512 kernels anyway; then the
bench turns the native kernels off (`GENSERVE_NATIVE_KERNELS=0`) and says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from genserve.kernels.cpu import cpu_flags, cpu_model, kernel_set

# the /proc/cpuinfo flags that pick a kernel path, in genserve or in llama.cpp (ggml)
RELEVANT_FLAGS = (
    "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512vbmi",
    "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
)  # fmt: skip

# What PyTorch may use under each kernel set: ATen's own vector code and oneDNN's.
TORCH_ISA = {"avx2-fma": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}

# a set that must not load genserve's AMX / AVX-512 libraries
_NO_AMX = ("avx512-bf16", "avx2-fma", "torch")
_NO_AVX512 = ("avx2-fma", "torch")


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
            for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
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


def honoured(name: str, amx_loaded: bool, avx512_loaded: bool) -> bool:
    """Whether genserve kept to the kernel set `name`, given which native libraries it loaded."""
    return not ((name in _NO_AMX and amx_loaded) or (name in _NO_AVX512 and avx512_loaded))


_PROBE = """
import os, sys
try:
    from genserve.kernels import load_amx_linear, load_decode_bf16
except ImportError:  # the loaders were reorganised: they read GENSERVE_KERNELS themselves
    print("0 0"); sys.exit()
print(int(load_amx_linear() is not None), int(load_decode_bf16() is not None))
"""


def kernels_honoured(name: str) -> bool:
    """Asks a fresh interpreter with GENSERVE_KERNELS=`name` which native libraries load."""
    env = {**os.environ, "GENSERVE_KERNELS": name}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"kernel probe failed: {out.stderr.strip()[-500:]}")
    amx, avx512 = (bool(int(w)) for w in out.stdout.split()[-2:])
    return honoured(name, amx, avx512)


def kernels_env(name: str, is_honoured: bool) -> dict[str, str]:
    """The environment that runs genserve on kernel set `name` (see the module docstring)."""
    env = {"GENSERVE_KERNELS": name, **TORCH_ISA.get(name, {})}
    if not is_honoured:
        env["GENSERVE_NATIVE_KERNELS"] = "0"
    return env


def reexec_with_kernels(name: str | None) -> None:
    """Re-runs this script with `kernels_env(name)` unless it is already in place: PyTorch reads
    its ISA limits when it is imported, before any argument is parsed."""
    if not name or os.environ.get("GENSERVE_KERNELS") == name:
        return
    env = kernels_env(name, kernels_honoured(name))
    if env.get("GENSERVE_NATIVE_KERNELS") == "0":
        print(f"GENSERVE_KERNELS={name} is not honoured by this genserve's kernel loaders: "
              "native kernels off, PyTorch ops only", file=sys.stderr)  # fmt: skip
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})


def default_kernel_sets(supported: list[str]) -> list[str]:
    """The kernel sets to compare by default: the best this CPU runs, and the AVX2 baseline
    (every x86-64-v3 CPU's) where that is another."""
    out = supported[:1]
    if "avx2-fma" in supported and "avx2-fma" not in out:
        out.append("avx2-fma")
    return out or ["torch"]

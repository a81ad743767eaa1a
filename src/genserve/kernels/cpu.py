"""What this CPU can run, and which native kernel set genserve uses on it.

Kernel sets, best first (each a build of the same kernel sources with other compiler flags):

- `amx`: AMX-BF16 tiles for matmuls and attention scores, AVX512-BF16 for the rest (Intel Xeon
  Sapphire Rapids and later), once Linux has granted the process AMX state;
- `avx512-bf16`: AVX-512 F/BW/VL with the bf16 dot product (AMD Zen 4/5, Intel Cooper Lake);
- `avx2-fma`: AVX2 + FMA + F16C (x86-64-v3: every x86 server CPU since 2015, AMD EPYC included);
  bf16 is widened to fp32 in registers;
- `torch`: no native kernels (other CPUs, ARM until a NEON set exists, no C compiler, or
  `GENSERVE_NATIVE_KERNELS=0`): PyTorch ops, the reference the kernels are tested against.

`GENSERVE_KERNELS=avx2-fma` (or any set this CPU can run) picks a lower set, e.g. to measure the
AVX2 path on an AVX-512 machine.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass
from functools import cache
from pathlib import Path

# kernel set -> the /proc/cpuinfo flags it needs
KERNEL_SETS: dict[str, tuple[str, ...]] = {
    "amx": ("amx_bf16", "amx_tile", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "fma"),
    "avx512-bf16": ("avx512_bf16", "avx512f", "avx512bw", "avx512vl", "fma"),
    "avx2-fma": ("avx2", "fma", "f16c"),
}
NATIVE_SETS = tuple(KERNEL_SETS)  # best first
TORCH = "torch"


@dataclass(frozen=True, slots=True)
class KernelSet:
    """The kernel set chosen for this process, and why (for the start-up log line)."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})" if self.reason else self.name


@cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has(*flags: str) -> bool:
    return set(flags) <= cpu_flags()


@cache
def amx_granted() -> bool:
    """Asks Linux for the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA); a process
    that uses the tiles without it is killed."""
    if platform.machine() != "x86_64" or not cpu_has("amx_tile"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18
        return libc.syscall(sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0
    except (OSError, AttributeError):
        return False


def supported_sets() -> list[str]:
    """Every native kernel set this CPU (and OS) can run, best first."""
    out = [name for name, flags in KERNEL_SETS.items() if cpu_has(*flags)]
    if "amx" in out and not amx_granted():
        out.remove("amx")
    return out


def native_enabled() -> bool:
    """GENSERVE_NATIVE_KERNELS=0 turns off every native path (kernels and weight prepacking)."""
    return os.environ.get("GENSERVE_NATIVE_KERNELS", "1") != "0"


def why_not(name: str) -> str:
    """Why a better set than the one chosen does not run: its first missing flag."""
    missing = [f for f in KERNEL_SETS[name] if f not in cpu_flags()]
    if missing:
        return f"no {missing[0]}"
    return "AMX state not granted" if name == "amx" else f"{name} refused"


def kernel_set() -> KernelSet:
    """The set this process runs: the best one the CPU supports, or GENSERVE_KERNELS's."""
    if not native_enabled():
        return KernelSet(TORCH, "GENSERVE_NATIVE_KERNELS=0")
    supported = supported_sets()
    wanted = os.environ.get("GENSERVE_KERNELS", "").strip()
    if wanted:
        if wanted == TORCH or wanted in supported:
            return KernelSet(wanted, "GENSERVE_KERNELS")
        raise ValueError(
            f"GENSERVE_KERNELS={wanted!r}: this CPU runs {', '.join([*supported, TORCH])}"
        )
    if not supported:
        return KernelSet(
            TORCH,
            why_not("avx2-fma")
            if platform.machine() == "x86_64"
            else f"no native kernels for {platform.machine()}",
        )
    best = supported[0]
    better = NATIVE_SETS[: NATIVE_SETS.index(best)]
    return KernelSet(best, ", ".join(why_not(name) for name in reversed(better)))

"""The one place that maps a kernel set (`kernels/cpu.py`) to the ctypes library the typed
wrappers (`small_ops`, `gemm`, `attention`, `decoder`) call."""

from __future__ import annotations

import ctypes

from genserve import kernels
from genserve.kernels.cpu import TORCH


def native_library(kernel_set: str) -> ctypes.CDLL | None:
    """The kernels of `kernel_set`, or None (the `torch` set, no compiler, or no build of that
    set yet): the layers then run PyTorch ops."""
    if kernel_set == TORCH:
        return None
    load_kernels = getattr(kernels, "load_kernels", None)
    if load_kernels is not None:
        return load_kernels(kernel_set)
    if kernel_set == "avx2-fma":
        return None  # no AVX2 build of the kernels before `load_kernels`
    return kernels.load_decode_bf16(amx=kernel_set == "amx")

"""The one place that maps a kernel set (`kernels/cpu.py`) to the ctypes library the typed
wrappers (`small_ops`, `gemm`, `attention`, `decoder`) call."""

from __future__ import annotations

import ctypes

from genserve import kernels
from genserve.kernels.cpu import TORCH


def native_library(kernel_set: str) -> ctypes.CDLL | None:
    """The kernels of `kernel_set`, or None (the `torch` set, a set this CPU cannot run, no
    compiler): the layers then run PyTorch ops."""
    if kernel_set == TORCH:
        return None
    return kernels.load_kernels(kernel_set)

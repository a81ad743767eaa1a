"""Binds a model's layers to one kernel set (`kernels/cpu.py`), once, before its first step:
each layer then picks its kernel per call from its dtype alone, never from the row count."""

from __future__ import annotations

import ctypes
import logging

import torch
from torch import nn

from genserve.kernels import load_kernels
from genserve.layers.attention import PagedAttention
from genserve.layers.basic import RMSNorm
from genserve.layers.packed_linear import LINEAR_KERNELS, Linear, Packing, pack_linear_weights

log = logging.getLogger(__name__)


def bind_layer_kernels(
    model: nn.Module, kernel_set: str, pack_budget: int
) -> tuple[ctypes.CDLL | None, int]:
    """Gives every RMSNorm, PagedAttention and Linear of `model` the set's native library (None
    for `torch`) and packs the linear weights where the set's matmul reads packed ones (within
    `pack_budget` bytes). Returns (the library, the bytes packed)."""
    lib = load_kernels(kernel_set)
    for m in model.modules():
        if isinstance(m, RMSNorm | PagedAttention | Linear):
            m.lib = lib
        if isinstance(m, Linear):
            m.packed = None  # a set bound before may have packed it
    model.packed_lm_head = None
    packed = 0
    dtype = next(model.parameters()).dtype
    if lib is not None and dtype == torch.bfloat16:
        amx = Packing.amx() if LINEAR_KERNELS[kernel_set] == "amx" else None
        packings = [amx] if amx is not None else []
        packed = pack_linear_weights(model, pack_budget, [*packings, Packing.panel(lib)])
    return lib, packed

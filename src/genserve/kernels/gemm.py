"""Typed wrapper of `genserve_gemm_bf16`: Y = X W^T (+ bias) on plain (unpacked) bf16 weights.

Each output element is one fp32 dot product over K in a fixed order whatever the row count M,
so a row's result does not depend on the rows beside it (batch invariance)."""

from __future__ import annotations

import ctypes

import torch


def gemm_bf16(
    lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    *, out_f32: bool = False,
) -> torch.Tensor:  # fmt: skip
    """x [M, K] bf16 (rows may be strided), weight [N, K] bf16 -> [M, N] bf16 (fp32 with
    `out_f32`: the accumulations, never rounded to bf16)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32 if out_f32 else torch.bfloat16)
    rc = lib.genserve_gemm_bf16(
        weight.data_ptr(), None if bias is None else bias.data_ptr(), x.data_ptr(), x.stride(0),
        y.data_ptr(), n, m, n, k, int(out_f32),
    )  # fmt: skip
    if rc:
        raise MemoryError("native gemm: its thread buffers did not fit in memory")
    return y

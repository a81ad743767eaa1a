"""The problems both bf16 linear kernels (gemm.c, panel_linear.c) are checked on against float32
PyTorch, and the tolerance they are held to."""

from __future__ import annotations

import torch


def problem(m: int, n: int, k: int, with_bias: bool):
    """(w [N, K], x [M, K] with a row stride that is not K, bias [N] or None, the float32 result)."""
    g = torch.Generator().manual_seed(m * 7 + n + k)
    w = (torch.randn(n, k, generator=g) * 0.1).bfloat16()
    x = torch.randn(m, k + 8, generator=g).bfloat16()[:, 3 : 3 + k]
    bias = torch.randn(n, generator=g).bfloat16() if with_bias else None
    ref = x.float() @ w.float().T + (0 if bias is None else bias.float())
    return w, x, bias, ref


def assert_close_to_float32(ours: torch.Tensor, ref: torch.Tensor, x, w) -> None:
    """fp32 sums of K exact bf16 products in another order: a few ulps of the sum of magnitudes."""
    scale = (x.float().abs() @ w.float().abs().T) + 1
    assert ((ours - ref).abs() <= scale * 1e-6 * x.shape[1] ** 0.5).all()

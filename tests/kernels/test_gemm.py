"""genserve_gemm_bf16 (kernels/gemm.c) on every kernel set this CPU runs: Y = X W^T (+ bias)
against float32 PyTorch, and batch invariance: a row's outputs are the same bits computed alone,
anywhere inside a batch of 7, 16, 33 or 300 rows, and with one thread or two."""

from __future__ import annotations

import pytest
import torch
from linear_cases import assert_close_to_float32, problem


def gemm(lib, w, x, bias=None, out_f32=True):
    """x: [M, K] bf16 (any row stride), w: [N, K] bf16 -> [M, N] fp32 or bf16."""
    m, k = x.shape
    y = torch.empty(m, w.shape[0], dtype=torch.float32 if out_f32 else torch.bfloat16)
    lib.genserve_gemm_bf16(
        w.data_ptr(), None if bias is None else bias.data_ptr(), x.data_ptr(), x.stride(0),
        y.data_ptr(), y.stride(0), m, w.shape[0], k, int(out_f32),
    )  # fmt: skip
    return y


# K: whole 16/32-wide chunks and tails; N: whole register blocks and remainders
@pytest.mark.parametrize(
    ("m", "n", "k"), [(1, 37, 100), (2, 64, 576), (33, 96, 1536), (300, 20, 40)]
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_matches_float32(kernels, m, n, k, with_bias):
    w, x, bias, ref = problem(m, n, k, with_bias)
    ours = gemm(kernels, w, x, bias)
    assert_close_to_float32(ours, ref, x, w)
    ours_bf16 = gemm(kernels, w, x, bias, out_f32=False)
    assert torch.equal(ours_bf16, ours.bfloat16())  # rounded once, from the same fp32 sum


@pytest.mark.parametrize("batch", [7, 16, 33, 300])
@pytest.mark.parametrize(("n", "k"), [(576, 576), (45, 1550)])
def test_gemm_row_is_batch_invariant(kernels, batch, n, k):
    g = torch.Generator().manual_seed(batch + k)
    w = (torch.randn(n, k, generator=g) * 0.1).bfloat16()
    x = torch.randn(batch, k, generator=g).bfloat16()
    for out_f32 in (True, False):
        together = gemm(kernels, w, x, out_f32=out_f32)
        for r in {0, batch // 2, batch - 1}:
            alone = gemm(kernels, w, x[r : r + 1].clone(), out_f32=out_f32)
            assert torch.equal(alone[0], together[r]), (r, out_f32)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(gemm(kernels, w, x, out_f32=out_f32), together)
        finally:
            torch.set_num_threads(threads)

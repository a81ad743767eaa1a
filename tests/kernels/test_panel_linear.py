"""genserve_panel_linear_bf16 / genserve_panel_glu_bf16 (kernels/panel_linear.c) on every
kernel set this CPU runs: against float32 PyTorch, the bf16 rounding, bias and fp32 output, odd
N and K, the GLU against genserve_silu_mul_bf16, and batch invariance (a row's bits alone, inside
batches of 7 to 1000 rows, with one thread or two)."""

from __future__ import annotations

import pytest
import torch
from linear_cases import assert_close_to_float32, problem


def pack(lib, w: torch.Tensor) -> torch.Tensor:
    """w: [N, K] bf16 -> the panel-packed copy (flat bf16)."""
    n, k = w.shape
    p = torch.empty(lib.genserve_panel_packed_size(n, k), dtype=torch.bfloat16)
    lib.genserve_panel_pack_bf16(w.data_ptr(), p.data_ptr(), n, k)
    return p


def linear(lib, p, n, x, bias=None, out_f32=True):
    """x: [M, K] bf16 (any row stride) -> [M, N] fp32 or bf16."""
    m, k = x.shape
    y = torch.empty(m, n, dtype=torch.float32 if out_f32 else torch.bfloat16)
    rc = lib.genserve_panel_linear_bf16(
        x.data_ptr(), x.stride(0), p.data_ptr(), None if bias is None else bias.data_ptr(),
        y.data_ptr(), y.stride(0), m, n, k, int(out_f32),
    )  # fmt: skip
    assert rc == 0
    return y


def glu(lib, p, inter, x):
    m, k = x.shape
    act = torch.empty(m, inter, dtype=torch.bfloat16)
    rc = lib.genserve_panel_glu_bf16(x.data_ptr(), x.stride(0), p.data_ptr(), act.data_ptr(),
                                     act.stride(0), m, inter, k)  # fmt: skip
    assert rc == 0
    return act


def test_pack_layout(kernels):
    """[ceil(N/16)][ceil(K/2)][16][2], zero past N and K."""
    n, k = 19, 5
    w = torch.arange(1, n * k + 1, dtype=torch.float32).reshape(n, k).bfloat16()
    p = pack(kernels, w).float()
    ref = torch.zeros(32, 6)
    ref[:n, :k] = w.float()
    assert torch.equal(p, ref.reshape(2, 16, 3, 2).permute(0, 2, 1, 3).reshape(-1))


# K: odd, pairs, whole and partial 32-wide chunks; N: whole panels, remainders, one column
@pytest.mark.parametrize(
    ("m", "n", "k"),
    [(1, 37, 100), (1, 1, 7), (2, 64, 576), (3, 50, 33), (5, 17, 31), (33, 96, 1536),
     (300, 20, 40), (7, 200, 577)],
)  # fmt: skip
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_float32(kernels, m, n, k, with_bias):
    w, x, bias, ref = problem(m, n, k, with_bias)
    p = pack(kernels, w)
    ours = linear(kernels, p, n, x, bias)
    assert_close_to_float32(ours, ref, x, w)
    ours_bf16 = linear(kernels, p, n, x, bias, out_f32=False)
    assert torch.equal(ours_bf16, ours.bfloat16())  # rounded once, from the same fp32 sum


@pytest.mark.parametrize(
    ("m", "inter", "k"), [(1, 64, 576), (2, 32, 33), (9, 48, 100), (40, 16, 1536)]
)
def test_glu_is_silu_mul_of_linear(kernels, m, inter, k):
    g = torch.Generator().manual_seed(m + inter + k)
    w = (torch.randn(2 * inter, k, generator=g) * 0.1).bfloat16()
    x = torch.randn(m, k, generator=g).bfloat16()
    p = pack(kernels, w)
    gu = linear(kernels, p, 2 * inter, x, out_f32=False)
    ref = torch.empty(m, inter, dtype=torch.bfloat16)
    kernels.genserve_silu_mul_bf16(gu.data_ptr(), ref.data_ptr(), m, inter)
    assert torch.equal(glu(kernels, p, inter, x), ref)
    # and PyTorch's bf16 silu-and-mul of the same bf16 linear output
    torch.testing.assert_close(ref, torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:])


def test_glu_refuses_partial_panels(kernels):
    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    act = torch.empty(1, 24, dtype=torch.bfloat16)
    assert kernels.genserve_panel_glu_bf16(x.data_ptr(), 8, x.data_ptr(), act.data_ptr(), 24,
                                           1, 24, 8) != 0  # fmt: skip


@pytest.mark.parametrize(("n", "k"), [(576, 576), (45, 1551)])
def test_row_is_batch_invariant(kernels, n, k):
    g = torch.Generator().manual_seed(n + k)
    w = (torch.randn(2 * n, k, generator=g) * 0.1).bfloat16()
    x = torch.randn(1000, k, generator=g).bfloat16()
    bias = torch.randn(2 * n, generator=g).bfloat16()
    p = pack(kernels, w)
    alone = {r: linear(kernels, p, 2 * n, x[r : r + 1].clone(), bias) for r in (0, 3, 500, 999)}
    alone_glu = {r: glu(kernels, p, n, x[r : r + 1].clone()) for r in alone} if n % 16 == 0 else {}
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            for batch in (2, 3, 7, 16, 33, 300, 1000):  # every register block shape
                together = linear(kernels, p, 2 * n, x[:batch], bias)
                both = glu(kernels, p, n, x[:batch]) if alone_glu else None
                for r, y in alone.items():
                    if r < batch:
                        assert torch.equal(y[0], together[r]), (nt, batch, r)
                        if alone_glu:
                            assert torch.equal(alone_glu[r][0], both[r]), (nt, batch, r)
    finally:
        torch.set_num_threads(threads)


def argmax(lib, p, n, x, n_valid, with_logprob=True):
    m, k = x.shape
    out = torch.empty(m, dtype=torch.int64)
    lp = torch.empty(m) if with_logprob else None
    rc = lib.genserve_panel_linear_argmax_bf16(
        x.data_ptr(), x.stride(0), p.data_ptr(), m, n, k, n_valid, out.data_ptr(),
        None if lp is None else lp.data_ptr(),
    )  # fmt: skip
    assert rc == 0
    return out, lp


@pytest.mark.parametrize(("n", "n_valid", "k"), [(1000, 1000, 64), (1000, 990, 65), (49, 33, 576)])
def test_argmax_matches_linear(kernels, n, n_valid, k):
    """The greedy lm_head: genserve_argmax_f32 of the fp32 logits, and their log-softmax;
    a row's choice and log-probability the same bits alone and in batches, 1 or 2 threads."""
    g = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=g) * 0.1).bfloat16()
    x = torch.randn(40, k, generator=g).bfloat16()
    p = pack(kernels, w)
    logits = linear(kernels, p, n, x)[:, :n_valid].contiguous()
    ref = torch.empty(40, dtype=torch.int64)
    kernels.genserve_argmax_f32(logits.data_ptr(), 40, n_valid, ref.data_ptr())
    ours, lp = argmax(kernels, p, n, x, n_valid)
    assert torch.equal(ours, ref)
    expect = logits.double().log_softmax(-1).gather(1, ref[:, None])[:, 0].float()
    torch.testing.assert_close(lp, expect, rtol=0, atol=1e-5)
    assert torch.equal(argmax(kernels, p, n, x, n_valid, with_logprob=False)[0], ref)
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            for r in (0, 17, 39):
                alone, lp1 = argmax(kernels, p, n, x[r : r + 1].clone(), n_valid)
                assert alone[0] == ours[r] and torch.equal(lp1[0], lp[r]), (nt, r)
    finally:
        torch.set_num_threads(threads)

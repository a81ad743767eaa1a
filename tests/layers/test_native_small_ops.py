"""The native small ops of a batched bf16 layer (`kernels/small_ops.c`), every kernel set against the PyTorch
ops they replace: bf16 results equal, but for the rare value where an fp32 result one rounding
step away falls on the other side of a bf16 rounding (then a product of two roundings, as SiLU * up,
can be two bf16 steps off)."""

from __future__ import annotations

import pytest
import torch

from genserve.layers.basic import RMSNorm, silu_and_mul


def assert_bf16_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Every value within two bf16 steps of the reference, and nearly all identical."""
    assert ours.dtype == ref.dtype == torch.bfloat16 and ours.shape == ref.shape
    a, b = ours.float(), ref.float()
    step = b.abs().clamp_min(1e-30) * 2**-6
    assert ((a - b).abs() <= step).all(), (a - b).abs().max()
    assert (a == b).float().mean() >= 0.995


# 576: SmolLM2's hidden size (16-lane path); 40: the scalar path
@pytest.mark.parametrize("hid", [576, 40])
@pytest.mark.parametrize("rows", [1, 37])
@pytest.mark.parametrize("residual", [True, False])
def test_add_rmsnorm_matches_torch(kernels, hid, rows, residual):
    lib = kernels
    g = torch.Generator().manual_seed(hid + rows)
    x = (torch.randn(rows, hid, generator=g) * 3).bfloat16()
    delta = (torch.randn(rows, hid, generator=g) * 2).bfloat16() if residual else None
    norm = RMSNorm(hid, 1e-5).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hid, generator=g))
    summed = (x.float() + delta.float()).bfloat16() if residual else x.clone()
    out = torch.empty_like(x)
    lib.genserve_add_rmsnorm_bf16(
        x.data_ptr(), None if delta is None else delta.data_ptr(), norm.weight.data_ptr(),
        out.data_ptr(), rows, hid, norm.eps,
    )  # fmt: skip
    assert torch.equal(x, summed)  # the residual stream, updated in place
    with torch.no_grad():
        assert_bf16_close(out, norm(summed))


@pytest.mark.parametrize("inter", [1536, 40])
def test_silu_mul_matches_torch(kernels, inter):
    lib = kernels
    g = torch.Generator().manual_seed(inter)
    gu = torch.randn(23, 2 * inter, generator=g) * 4
    gu[0, :8] = torch.tensor([-200.0, -90.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 200.0])
    gu = gu.bfloat16()
    act = torch.empty(23, inter, dtype=torch.bfloat16)
    lib.genserve_silu_mul_bf16(gu.data_ptr(), act.data_ptr(), 23, inter)
    ref = silu_and_mul(gu)
    # past -88, exp overflows in PyTorch (silu = -0.0) while the kernel keeps a tiny value
    tiny = ref.float().abs() < 1e-30
    assert (act.float()[tiny].abs() < 1e-30).all()
    assert_bf16_close(act[~tiny], ref[~tiny])

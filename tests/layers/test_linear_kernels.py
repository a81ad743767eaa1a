"""Linear's bf16 matmul by kernel set (`LINEAR_KERNELS`): each set binds the kernel it names,
for every row count, and each gives F.linear's values within one bf16 rounding; every set this
CPU runs is bound for real."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genserve.kernels.cpu import TORCH, supported_sets
from genserve.layers import kernels as layer_kernels
from genserve.layers.packed_linear import LINEAR_KERNELS, Linear


class _Tiny(nn.Module):
    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.proj = Linear(k, n, bias=True)


def _kernel_of(lin: Linear) -> str:
    if lin.packed is not None:
        return lin.packed.packing.name
    return "gemm" if lin.lib is not None else "torch"


@pytest.mark.parametrize("kernels", [*supported_sets(), TORCH])
@pytest.mark.parametrize(("k", "n"), [(96, 160), (64, 48)])
def test_each_set_binds_its_linear_kernel(kernels, k, n):
    torch.manual_seed(k + n)
    model = _Tiny(k, n).bfloat16()
    lib, _ = layer_kernels.bind_layer_kernels(model, kernels, pack_budget=1 << 30)
    want = LINEAR_KERNELS[kernels] if lib is not None else "torch"
    if want == "amx" and n % 16:  # a shape the tiles do not take: the panels
        want = "panel"
    assert _kernel_of(model.proj) == want
    for rows in (1, 2, 7, 33, 300):
        x = torch.randn(rows, k).bfloat16()
        exact = F.linear(x.float(), model.proj.weight.float(), model.proj.bias.float())
        with torch.inference_mode():
            got = model.proj(x)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        assert (got.float() - exact).abs().max() <= exact.abs().max() * 2**-7 + 0.02


@pytest.mark.parametrize("budget", [0, 1 << 30])
def test_each_route_is_row_invariant(kernel_set, budget):
    """The packed route, and the plain-weight gemm where the packing does not fit its budget:
    each row's output is the same alone and in any batch."""
    model = _Tiny(576, 960).bfloat16()
    layer_kernels.bind_layer_kernels(model, kernel_set, pack_budget=budget)
    assert _kernel_of(model.proj) == ("gemm" if budget == 0 else LINEAR_KERNELS[kernel_set])
    x = torch.randn(64, 576).bfloat16()
    with torch.inference_mode():
        batched = model.proj(x)
        alone = torch.cat([model.proj(x[i : i + 1]) for i in range(64)])
    assert torch.equal(batched, alone)

"""Linear's bf16 matmul by kernel set (`LINEAR_KERNELS`): each set binds the kernel it names,
for every row count, and each gives F.linear's values within one bf16 rounding. Sets this CPU
runs are bound for real; a set's build that does not exist yet (avx2-fma before its library)
leaves PyTorch's matmul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genserve.kernels.cpu import TORCH, supported_sets
from genserve.kernels.library import native_library
from genserve.layers import kernels as layer_kernels
from genserve.layers.packed_linear import LINEAR_KERNELS, Linear


class _Tiny(nn.Module):
    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.proj = Linear(k, n, bias=True)


def _kernel_of(lin: Linear) -> str:
    if lin.packed is not None:
        return "amx" if lin.packed.amx is not None else "onednn"
    return "gemm" if lin.lib is not None else "torch"


@pytest.mark.parametrize("kernels", [*supported_sets(), TORCH])
@pytest.mark.parametrize(("k", "n"), [(96, 160), (64, 48)])
def test_each_set_binds_its_linear_kernel(kernels, k, n):
    torch.manual_seed(k + n)
    model = _Tiny(k, n).bfloat16()
    lib, _ = layer_kernels.bind_layer_kernels(model, kernels, pack_budget=1 << 30)
    want = LINEAR_KERNELS[kernels] if lib is not None else "torch"
    if want == "amx" and n % 16:  # a shape the tiles do not take: the gemm on the plain weight
        want = "gemm"
    assert _kernel_of(model.proj) == want
    for rows in (1, 2, 7, 33, 300):
        x = torch.randn(rows, k).bfloat16()
        exact = F.linear(x.float(), model.proj.weight.float(), model.proj.bias.float())
        with torch.inference_mode():
            got = model.proj(x)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        assert (got.float() - exact).abs().max() <= exact.abs().max() * 2**-7 + 0.02


def test_gemm_routing_forced_on_an_avx512_build(monkeypatch):
    """The avx2-fma route (genserve_gemm_bf16 at every row count) on the AVX-512 build, until
    the AVX2 build exists: each row's output is the same alone and in any batch."""
    lib = native_library("avx512-bf16")
    if lib is None:
        pytest.skip("no AVX512-BF16 build on this CPU")
    monkeypatch.setattr(layer_kernels, "native_library", lambda name: lib)
    model = _Tiny(576, 960).bfloat16()
    layer_kernels.bind_layer_kernels(model, "avx2-fma", pack_budget=1 << 30)
    assert _kernel_of(model.proj) == "gemm"
    x = torch.randn(64, 576).bfloat16()
    with torch.inference_mode():
        batched = model.proj(x)
        alone = torch.cat([model.proj(x[i : i + 1]) for i in range(64)])
    assert torch.equal(batched, alone)

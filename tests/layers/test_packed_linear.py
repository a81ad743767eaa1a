"""Prepacked linear weights (AMX tiles where the CPU has AMX, else oneDNN's layout) give
F.linear's result, with and without bias, on both sides of the row threshold, for shapes the
AMX kernel takes and shapes it leaves to oneDNN; fp32 output is the unrounded accumulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genserve.kernels import load_amx_linear
from genserve.layers import packed_linear as pl
from genserve.layers.packed_linear import (
    PACKED_MAX_ROWS,
    Linear,
    PackedWeight,
    pack_linear_weights,
    packing_supported,
)

pytestmark = pytest.mark.skipif(
    not packing_supported(torch.bfloat16), reason="neither AMX nor oneDNN bf16 on this CPU"
)

BACKENDS = ["amx", "onednn"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "amx" and load_amx_linear() is None:
        pytest.skip("no AMX-BF16 on this CPU")
    if request.param == "onednn":
        monkeypatch.setattr(pl, "load_amx_linear", lambda: None)
    return request.param


def _exact(x, w, b):
    return F.linear(x.float(), w.float(), None if b is None else b.float())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 9, 32, 33, 100, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1])
@pytest.mark.parametrize(("k", "n"), [(96, 160), (64, 48), (100, 40)])
def test_packed_linear_matches_plain(backend, rows, bias, k, n):
    torch.manual_seed(rows + k)
    lin = Linear(k, n, bias=bias).bfloat16()
    x = torch.randn(rows, k).bfloat16()
    plain = F.linear(x, lin.weight, lin.bias)
    exact = _exact(x, lin.weight, lin.bias)
    assert pack_linear_weights(lin, budget_bytes=1 << 30) > 0 and lin.packed is not None
    amx = lin.packed.amx is not None
    assert amx == (backend == "amx" and k % 32 == 0 and n % 16 == 0)
    with torch.inference_mode():
        packed = lin(x)
    assert packed.dtype == torch.bfloat16 and packed.shape == plain.shape
    # both are fp32 accumulations rounded once to bf16: equal up to one bf16 ulp
    assert (packed.float() - exact).abs().max() <= (plain.float() - exact).abs().max() * 1.01 + 0.02


def test_fp32_output_is_the_accumulation(backend):
    torch.manual_seed(0)
    w = torch.randn(4096, 128).bfloat16()
    x = torch.randn(20, 128).bfloat16()
    out = PackedWeight(w)(x, out_f32=True)
    assert out.dtype == torch.float32
    exact = _exact(x, w, None)
    err = (out - exact).abs().max().item()
    if backend == "amx":  # no bf16 rounding at all: only fp32 summation order
        assert err < 1e-3, err
    else:  # oneDNN rounds its bf16 output first: half a bf16 ulp
        assert err <= exact.abs().max().item() * 2**-8, err


def test_packing_respects_budget():
    lin = Linear(64, 64).bfloat16()
    assert pack_linear_weights(lin, budget_bytes=100) == 0
    assert lin.packed is None

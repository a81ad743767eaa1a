"""oneDNN-prepacked linear weights give F.linear's result (bf16), with and without bias, on
both sides of the row threshold, and the model's prepacked output projection matches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genserve.layers.packed_linear import (
    PACKED_MAX_ROWS,
    Linear,
    pack_linear_weights,
    packing_supported,
)

pytestmark = pytest.mark.skipif(
    not packing_supported(torch.bfloat16), reason="oneDNN bf16 unavailable on this CPU"
)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 9, 32, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1])
def test_packed_linear_matches_plain(rows, bias):
    torch.manual_seed(rows)
    lin = Linear(96, 160, bias=bias).bfloat16()
    x = torch.randn(rows, 96).bfloat16()
    plain = F.linear(x, lin.weight, lin.bias)
    exact = F.linear(x.float(), lin.weight.float(), None if lin.bias is None else lin.bias.float())
    assert pack_linear_weights(lin, budget_bytes=1 << 30) > 0 and lin.packed is not None
    with torch.inference_mode():
        packed = lin(x)
    assert packed.dtype == torch.bfloat16 and packed.shape == plain.shape
    # both are fp32 accumulations rounded once to bf16: equal up to one bf16 ulp
    assert (packed.float() - exact).abs().max() <= (plain.float() - exact).abs().max() * 1.01 + 0.02


def test_packing_respects_budget():
    lin = Linear(64, 64).bfloat16()
    assert pack_linear_weights(lin, budget_bytes=100) == 0
    assert lin.packed is None

"""Prepacked linear weights, for every packing family this CPU runs (AMX tiles; the panels of
each kernel set), give F.linear's result with and without bias at every row count, for shapes
the AMX tiles take and shapes they leave to the panels; fp32 output is the unrounded
accumulation; the fused argmax and the GLU epilogue give what the logits and silu_mul give."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from genserve.kernels import load_kernels
from genserve.layers.packed_linear import Linear, PackedWeight, Packing, pack_linear_weights
from genserve.sampling.sampler import argmax_rows


@pytest.fixture()
def packings(use_kernel_set) -> list[Packing]:
    """The set's packing families, preferred first (`amx`: AMX tiles, then panels)."""
    amx = Packing.amx() if use_kernel_set == "amx" else None
    return [*([amx] if amx is not None else []), Packing.panel(load_kernels(use_kernel_set))]


@pytest.fixture()
def packing(packings) -> Packing:
    return packings[0]


def _exact(x, w, b):
    return F.linear(x.float(), w.float(), None if b is None else b.float())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 9, 32, 33, 100, 256, 257])
@pytest.mark.parametrize(("k", "n"), [(96, 160), (64, 48), (100, 40)])
def test_packed_linear_matches_plain(packings, rows, bias, k, n):
    torch.manual_seed(rows + k)
    lin = Linear(k, n, bias=bias).bfloat16()
    x = torch.randn(rows, k).bfloat16()
    plain = F.linear(x, lin.weight, lin.bias)
    exact = _exact(x, lin.weight, lin.bias)
    assert pack_linear_weights(lin, 1 << 30, packings) > 0 and lin.packed is not None
    amx = lin.packed.packing.name == "amx"
    assert amx == (packings[0].name == "amx" and k % 32 == 0 and n % 16 == 0)
    with torch.inference_mode():
        packed = lin(x)
    assert packed.dtype == torch.bfloat16 and packed.shape == plain.shape
    # both are fp32 accumulations rounded once to bf16: equal up to one bf16 ulp
    assert (packed.float() - exact).abs().max() <= (plain.float() - exact).abs().max() * 1.01 + 0.02


def test_fp32_output_is_the_accumulation(packing):
    torch.manual_seed(0)
    w = torch.randn(4096, 128).bfloat16()
    x = torch.randn(20, 128).bfloat16()
    out = PackedWeight(w, packing)(x, out_f32=True)
    assert out.dtype == torch.float32
    err = (out - _exact(x, w, None)).abs().max().item()
    assert err < 1e-3, err  # no bf16 rounding at all: only fp32 summation order


def test_packing_respects_budget(packing):
    lin = Linear(64, 64).bfloat16()
    assert pack_linear_weights(lin, 100, [packing]) == 0
    assert lin.packed is None


@pytest.mark.parametrize("rows", [1, 7, 32, 33, 70])
@pytest.mark.parametrize(("n", "n_valid"), [(4096, 4096), (960, 950), (48, 17), (16, 16)])
def test_fused_argmax_chooses_as_argmax_rows(packing, rows, n, n_valid):
    """The output projection's fused argmax picks what argmax_rows picks on the fp32 logits
    it would have written, columns past n_valid (padded vocabulary) never chosen; its
    logprobs are those logits' log_softmax at the choice (as the sampler computes them)."""
    torch.manual_seed(rows * n)
    w = torch.randn(n, 64).bfloat16()
    x = torch.randn(rows, 64).bfloat16()
    head = PackedWeight(w, packing)
    logits = head(x, out_f32=True)[:, :n_valid]
    ids, none = head.argmax(x, n_valid)
    assert none is None and ids.dtype == torch.int64
    assert torch.equal(ids, argmax_rows(logits))
    assert torch.equal(ids, logits.argmax(dim=1))
    same, lps = head.argmax(x, n_valid, logprobs=True)
    assert torch.equal(same, ids) and lps.dtype == torch.float32
    expected = (logits.gather(1, ids.unsqueeze(1)) - logits.logsumexp(1, keepdim=True)).squeeze(1)
    torch.testing.assert_close(lps, expected, rtol=1e-5, atol=1e-5)


def test_fused_argmax_ties_and_inf_rows(packing):
    """Ties go to the first column (across lanes and threads); a row whose logits are all
    -inf gives 0, as argmax_rows; n_valid out of range: None (the caller computes logits)."""
    torch.manual_seed(1)
    w = torch.randn(2048, 64).bfloat16()
    for col in (1500, 37, 900):  # equal columns: the same logit, the first one wins
        w[col] = w[600]
    x = torch.stack([w[600], w[600], torch.zeros(64, dtype=torch.bfloat16)]).contiguous()
    head = PackedWeight(w, packing)
    got, lps = head.argmax(x, 2048, logprobs=True)
    assert got[:2].tolist() == [37, 37]
    # four equal best logits: each has at most log(1/4); a row of zeros: every logit 0
    assert lps[0].item() <= -math.log(4) + 1e-6
    assert lps[2].item() == pytest.approx(-math.log(2048), abs=1e-5)
    assert got.tolist() == argmax_rows(head(x, out_f32=True)).tolist()
    w_inf = torch.full((64, 64), float("-inf")).bfloat16()
    x_pos = torch.ones(2, 64).bfloat16()
    assert PackedWeight(w_inf, packing).argmax(x_pos, 64)[0].tolist() == [0, 0]
    assert head.argmax(x, 0) is None and head.argmax(x, 2049) is None


@pytest.mark.parametrize("rows", [1, 7, 32, 33, 70])
@pytest.mark.parametrize(("inter", "k"), [(1536, 576), (48, 64), (16, 32)])
def test_glu_is_silu_mul_of_the_linear(packing, rows, inter, k):
    """The gate_up projection with silu_and_mul in its epilogue gives exactly the bf16 values of
    the linear followed by the native silu_mul (itself PyTorch's silu(g) * u within rounding)."""
    lib = load_kernels()
    torch.manual_seed(rows + inter)
    w = (torch.randn(2 * inter, k) * 0.3).bfloat16()
    x = torch.randn(rows, k).bfloat16()
    gate_up = PackedWeight(w, packing)
    gu = gate_up(x)
    expected = torch.empty(rows, inter, dtype=torch.bfloat16)
    lib.genserve_silu_mul_bf16(gu.data_ptr(), expected.data_ptr(), rows, inter)
    got = gate_up.glu(x)
    assert got is not None and torch.equal(got, expected)
    g, u = gu.split(inter, dim=1)
    ref = (F.silu(g) * u).float()
    assert (got.float() - ref).abs().max() <= ref.abs().max() * 2**-7
    # 48 outputs: 24 intermediate columns, not whole 16-column blocks: the caller falls back
    assert PackedWeight(torch.randn(48, k).bfloat16(), packing).glu(x) is None


@pytest.mark.parametrize("rows", [33, 300, 1000])
def test_a_row_is_the_same_in_any_batch(packing, rows):
    """Linear and GLU on the packing: each row's bits alone equal its bits inside `rows` rows
    (past the AMX linear's 256-row chunks too)."""
    torch.manual_seed(rows)
    w = (torch.randn(2 * 96, 576) * 0.1).bfloat16()
    x = torch.randn(rows, 576).bfloat16()
    packed = PackedWeight(w, packing)
    for i in (0, rows // 2, rows - 1):
        assert torch.equal(packed(x)[i], packed(x[i : i + 1])[0])
        assert torch.equal(packed(x, out_f32=True)[i], packed(x[i : i + 1], out_f32=True)[0])
        assert torch.equal(packed.glu(x)[i], packed.glu(x[i : i + 1])[0])

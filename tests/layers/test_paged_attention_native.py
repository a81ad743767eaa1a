"""The native batched paged decode attention (kernels/attention_decode.c), every kernel set, against a float32
reference and against the SDPA path it replaces: scattered blocks, odd lengths and block sizes,
grouped-query layouts, the vectorised head sizes (multiples of 32) and the generic one."""

from __future__ import annotations

import pytest
import torch

from genserve.engine.forward_context import ForwardContext, forward_context
from genserve.layers.attention import PagedAttention


def _reference(q, kc, vc, tables, lens, scale):
    """Per row and head: softmax(q K^T) V in float32 over the row's own blocks."""
    n, h, d = q.shape
    kvh = kc.shape[2]
    out = torch.empty(n, h, d)
    for t in range(n):
        length = int(lens[t])
        k = kc[tables[t]].reshape(-1, kvh, d)[:length].float()
        v = vc[tables[t]].reshape(-1, kvh, d)[:length].float()
        for head in range(h):
            g = head // (h // kvh)
            p = torch.softmax(q[t, head].float() @ k[:, g].T * scale, dim=-1)
            out[t, head] = p @ v[:, g]
    return out


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block_size",
    [
        (9, 3, 64, 16),
        (4, 4, 32, 4),
        (8, 2, 128, 5),
        (6, 2, 48, 16),
        (16, 1, 64, 7),
        (8, 2, 128, 32),
    ],
)
# 3 rows: one work item per (row, KV head); 13 rows: one per row, all its KV heads together.
# The amx set's scores come from AMX tiles (block sizes that are multiples of 16).
@pytest.mark.parametrize("rows", [3, 13])
def test_native_decode_attention_matches_reference(
    kernels, heads, kv_heads, head_dim, block_size, rows
):
    lib = kernels
    g = torch.Generator().manual_seed(heads * 100 + head_dim)
    lens = torch.tensor([1, 2, 15, 16, 17, 31, 33, 64, 100, 129, 150, 7, 250])[-rows:]
    n = lens.numel()
    width = (int(lens.max()) + block_size - 1) // block_size
    num_blocks = n * width + 10
    att = PagedAttention(heads, kv_heads, head_dim)
    att.k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).bfloat16()
    att.v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).bfloat16()
    perm = torch.randperm(num_blocks - 1, generator=g)[: n * width] + 1
    tables = perm.view(n, width)  # every row's blocks scattered over the cache
    q = (torch.randn(n, heads, head_dim, generator=g) * 2).bfloat16()
    ctx = ForwardContext(
        slot_mapping=torch.zeros(n, dtype=torch.long), num_decode=n, decode_block_tables=tables,
        decode_context_lens=lens, decode_max_context=int(lens.max()), prefills=[], seq_ends=[],
    )  # fmt: skip
    ref = _reference(q, att.k_cache, att.v_cache, tables, lens, att.scale)
    with torch.inference_mode(), forward_context(ctx):
        sdpa = att._decode(q, ctx)  # lib is None: gathered blocks through SDPA
        att.lib = lib
        native = att._decode(q, ctx)
    assert native.dtype == torch.bfloat16 and native.shape == q.shape
    err_native = (native.float() - ref).abs().max().item()
    err_sdpa = (sdpa.float() - ref).abs().max().item()
    # one bf16 rounding of outputs below 4 in magnitude: at most 2^-7 relative
    assert err_native <= 0.016, (err_native, err_sdpa)
    assert (native.float() - ref).abs().mean() <= 1.5 * (sdpa.float() - ref).abs().mean() + 1e-4


def test_native_argmax_is_torch_argmax(use_kernel_set):
    from genserve.sampling.sampler import argmax_rows

    g = torch.Generator().manual_seed(5)
    for rows, n in [(1, 49152), (32, 49152), (3, 17), (5, 1), (4, 100)]:
        x = torch.randn(rows, n, generator=g)
        assert torch.equal(argmax_rows(x), x.argmax(dim=1))
    x = torch.zeros(4, 50)  # ties: the first index, also across lanes
    x[0, [3, 40]] = 1.0
    x[1, [35, 19]] = 2.0
    x[2] = float("-inf")  # all masked out: 0, as PyTorch
    x[3, [49, 48]] = 7.0
    assert argmax_rows(x).tolist() == x.argmax(dim=1).tolist() == [3, 19, 0, 48]

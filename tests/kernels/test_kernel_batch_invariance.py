"""Batch invariance of the per-row kernels on every kernel set this CPU runs (issue 14, item 6):
a row's paged decode attention, residual add + RMSNorm, q/k-norm + rotary + cache write,
SiLU-and-mul and logsumexp give the same bits computed alone and inside batches of 7, 16 and 33
rows (33 rows also take the attention's one-item-per-row schedule on the AVX-512 sets)."""

from __future__ import annotations

import pytest
import torch

BATCHES = [7, 16, 33]


def _rows(batch: int) -> list[int]:
    return sorted({0, batch // 2, batch - 1})


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size"), [(9, 3, 64, 16), (6, 2, 48, 5)]
)
def test_decode_attention_row_is_batch_invariant(
    kernels, batch, heads, kv_heads, head_dim, block_size
):
    g = torch.Generator().manual_seed(batch * heads)
    lens = torch.randint(1, 200, (batch,), generator=g)
    width = (int(lens.max()) + block_size - 1) // block_size
    num_blocks = batch * width + 1
    kc = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).bfloat16()
    vc = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).bfloat16()
    tables = (torch.randperm(num_blocks - 1, generator=g)[: batch * width] + 1).view(batch, width)
    q = torch.randn(batch, heads * head_dim, generator=g).bfloat16()

    def attend(rows: slice) -> torch.Tensor:
        qq, tt, ll = q[rows].contiguous(), tables[rows].contiguous(), lens[rows].contiguous()
        out = torch.empty_like(qq)
        rc = kernels.genserve_paged_decode_attention_bf16(
            qq.data_ptr(), qq.stride(0), out.data_ptr(), out.stride(0), kc.data_ptr(),
            vc.data_ptr(), tt.data_ptr(), width, ll.data_ptr(), int(lens.max()), qq.shape[0],
            heads, kv_heads, head_dim, block_size, head_dim**-0.5,
        )  # fmt: skip
        assert rc == 0
        return out

    together = attend(slice(0, batch))
    for r in _rows(batch):
        assert torch.equal(attend(slice(r, r + 1))[0], together[r]), r


@pytest.mark.parametrize("batch", BATCHES)
def test_small_ops_row_is_batch_invariant(kernels, batch):
    g = torch.Generator().manual_seed(batch)
    hid, inter, heads, kv_heads, d = 576, 1536, 9, 3, 64
    x = torch.randn(batch, hid, generator=g).bfloat16()
    delta = torch.randn(batch, hid, generator=g).bfloat16()
    w = torch.randn(hid, generator=g).bfloat16()
    gu = torch.randn(batch, 2 * inter, generator=g).bfloat16()
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * d, generator=g).bfloat16()
    cos_sin = torch.randn(batch, d, generator=g)
    norm = torch.randn(d, generator=g).bfloat16()

    def ops(rows: slice):
        t = len(range(*rows.indices(batch)))
        xr, normed, act = x[rows].clone(), torch.empty(t, hid, dtype=torch.bfloat16), None
        kernels.genserve_add_rmsnorm_bf16(
            xr.data_ptr(), delta[rows].contiguous().data_ptr(), w.data_ptr(), normed.data_ptr(),
            t, hid, 1e-5,
        )  # fmt: skip
        act = torch.empty(t, inter, dtype=torch.bfloat16)
        kernels.genserve_silu_mul_bf16(gu[rows].contiguous().data_ptr(), act.data_ptr(), t, inter)
        q = qkv[rows].clone()
        kc = torch.zeros(t, kv_heads, d, dtype=torch.bfloat16)
        vc = torch.zeros_like(kc)
        slots = torch.arange(t)
        kernels.genserve_qkv_post_bf16(
            q.data_ptr(), t, heads, kv_heads, d, cos_sin[rows].contiguous().data_ptr(),
            norm.data_ptr(), norm.data_ptr(), 1e-6, kc.data_ptr(), vc.data_ptr(), slots.data_ptr(),
        )  # fmt: skip
        return xr, normed, act, q, kc, vc

    together = ops(slice(0, batch))
    for r in _rows(batch):
        alone = ops(slice(r, r + 1))
        for a, b in zip(alone, together, strict=True):
            assert torch.equal(a[0], b[r]), r


@pytest.mark.parametrize("batch", BATCHES)
def test_logsumexp_and_argmax_rows_are_batch_invariant(kernels, batch):
    x = torch.randn(batch, 49152 + 5, generator=torch.Generator().manual_seed(batch)) * 4

    def run(rows: slice):
        xr = x[rows].contiguous()
        t, n = xr.shape
        lse, idx = torch.empty(t), torch.empty(t, dtype=torch.long)
        kernels.genserve_logsumexp_f32(xr.data_ptr(), n, t, n, lse.data_ptr())
        kernels.genserve_argmax_f32(xr.data_ptr(), t, n, idx.data_ptr())
        return lse, idx

    lse, idx = run(slice(0, batch))
    # fp32 sums of 49,157 terms in another order than PyTorch's: a few 1e-6 apart
    torch.testing.assert_close(lse, torch.logsumexp(x, 1), rtol=1e-5, atol=1e-5)
    assert torch.equal(idx, x.argmax(1))
    for r in _rows(batch):
        lse_r, idx_r = run(slice(r, r + 1))
        assert torch.equal(lse_r[0], lse[r]) and idx_r[0] == idx[r]


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size"), [(9, 3, 64, 16), (6, 2, 48, 5)]
)
def test_prefill_query_is_its_decode_row(kernels, heads, kv_heads, head_dim, block_size):
    """genserve_prefill_attention_bf16 gives each query of a chunk the bits the decode kernel
    gives a row of the same context (chunk of 40 tokens after a cached prefix of 90)."""
    g = torch.Generator().manual_seed(heads)
    ctx, n = 130, 40
    width = (ctx + block_size - 1) // block_size
    kc = torch.randn(width + 3, block_size, kv_heads, head_dim, generator=g).bfloat16()
    vc = torch.randn_like(kc)
    table = (torch.randperm(width + 2, generator=g)[:width] + 1).view(1, width)
    qd, kvd = heads * head_dim, kv_heads * head_dim
    qkv = torch.randn(n, qd + 2 * kvd, generator=g).bfloat16()  # K/V columns unread: in the cache
    meta = torch.tensor([[0], [n], [ctx]])
    prefill = torch.empty(n, qd, dtype=torch.bfloat16)
    rc = kernels.genserve_prefill_attention_bf16(
        qkv.data_ptr(), qkv.stride(0), prefill.data_ptr(), qd, kc.data_ptr(), vc.data_ptr(),
        table.data_ptr(), width, meta[0].data_ptr(), meta[1].data_ptr(), meta[2].data_ptr(), 1,
        heads, kv_heads, head_dim, block_size, head_dim**-0.5,
    )  # fmt: skip
    assert rc == 0
    q = qkv[:, :qd].contiguous()
    lens = torch.arange(ctx - n + 1, ctx + 1)
    decode = torch.empty_like(q)
    tables = table.expand(n, width).contiguous()  # kept alive through the call
    rc = kernels.genserve_paged_decode_attention_bf16(
        q.data_ptr(), qd, decode.data_ptr(), qd, kc.data_ptr(), vc.data_ptr(),
        tables.data_ptr(), width, lens.data_ptr(), ctx, n, heads,
        kv_heads, head_dim, block_size, head_dim**-0.5,
    )  # fmt: skip
    assert rc == 0
    assert torch.equal(prefill, decode)

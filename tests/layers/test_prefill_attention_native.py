"""Prefill attention (kernels/attention_prefill.c: every set's `genserve_prefill_attention_bf16`,
the amx set's `genserve_prefill_attention_amx` in tiles)
against a float32 reference and against the SDPA path it replaces (`PagedAttention._prefill`):
several chunks at once, with and without a cached prefix, lengths that are not multiples of 16,
scattered blocks, grouped-query layouts."""

from __future__ import annotations

import pytest
import torch

from genserve.layers.attention import PagedAttention


def prefill_kernels(lib) -> list:
    """every kernel set's genserve_prefill_attention_bf16, and the amx set's tile kernel"""
    names = ("genserve_prefill_attention_bf16", "genserve_prefill_attention_amx")
    return [getattr(lib, name) for name in names if hasattr(lib, name)]


def _reference(q, k, v, start, scale):
    """q: [n, H, D] at positions start.., k/v: [ctx, KVH, D]; causal softmax(q k^T) v in fp32."""
    n, h, d = q.shape
    group = h // k.shape[1]
    kk = k.float().repeat_interleave(group, 1)
    vv = v.float().repeat_interleave(group, 1)
    s = torch.einsum("nhd,khd->hnk", q.float(), kk) * scale
    pos = torch.arange(n)[:, None] + start
    s = s.masked_fill(torch.arange(k.shape[0])[None, :] > pos, float("-inf"))
    return torch.einsum("hnk,khd->nhd", s.softmax(-1), vv)


# (context_len, new tokens) per chunk: whole prompts, cached prefixes, one-token chunks
CHUNKS = [(128, 128), (37, 37), (200, 23), (16, 16), (65, 1), (300, 140)]


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (8, 2, 128, 5), (4, 4, 32, 7)]
)
def test_native_prefill_attention_matches_reference(kernels, heads, kv_heads, head_dim, block_size):
    for prefill in prefill_kernels(kernels):
        _check(prefill, heads, kv_heads, head_dim, block_size)


def _check(prefill, heads, kv_heads, head_dim, block_size):
    g = torch.Generator().manual_seed(heads + head_dim + block_size)
    att = PagedAttention(heads, kv_heads, head_dim)
    blocks = [(c + block_size - 1) // block_size for c, _ in CHUNKS]
    num_blocks = sum(blocks) + 8
    att.k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).bfloat16()
    att.v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).bfloat16()
    perm = torch.randperm(num_blocks - 1, generator=g) + 1
    tables, at = [], 0
    for b in blocks:
        tables.append(perm[at : at + b])
        at += b
    width = max(blocks)
    padded = torch.zeros(len(CHUNKS), width, dtype=torch.int64)
    for i, t in enumerate(tables):
        padded[i, : t.numel()] = t
    # the qkv rows of every chunk, one after another; K/V columns hold what the cache holds
    qd, kvd = heads * head_dim, kv_heads * head_dim
    rows = sum(n for _, n in CHUNKS)
    qkv = torch.empty(rows, qd + 2 * kvd, dtype=torch.bfloat16)
    qkv[:, :qd] = (torch.randn(rows, qd, generator=g) * 2).bfloat16()
    starts, row = [], 0
    for (ctx, n), t in zip(CHUNKS, tables, strict=True):
        k = att.k_cache[t].reshape(-1, kv_heads, head_dim)[:ctx]
        v = att.v_cache[t].reshape(-1, kv_heads, head_dim)[:ctx]
        qkv[row : row + n, qd : qd + kvd] = k[ctx - n :].reshape(n, kvd)
        qkv[row : row + n, qd + kvd :] = v[ctx - n :].reshape(n, kvd)
        starts.append(row)
        row += n
    meta = torch.tensor([starts, [n for _, n in CHUNKS], [c for c, _ in CHUNKS]], dtype=torch.int64)
    out = torch.full((rows, qd), float("nan"), dtype=torch.bfloat16)
    rc = prefill(
        qkv.data_ptr(), qkv.shape[1], out.data_ptr(), qd, att.k_cache.data_ptr(),
        att.v_cache.data_ptr(), padded.data_ptr(), width, meta[0].data_ptr(), meta[1].data_ptr(),
        meta[2].data_ptr(), len(CHUNKS), heads, kv_heads, head_dim, block_size, att.scale,
    )  # fmt: skip
    assert rc == 0
    for (ctx, n), t, r0 in zip(CHUNKS, tables, starts, strict=True):
        q = qkv[r0 : r0 + n, :qd].view(n, heads, head_dim)
        k = att.k_cache[t].reshape(-1, kv_heads, head_dim)[:ctx]
        v = att.v_cache[t].reshape(-1, kv_heads, head_dim)[:ctx]
        ref = _reference(q, k, v, ctx - n, att.scale)
        ours = out[r0 : r0 + n].view(n, heads, head_dim).float()
        with torch.inference_mode():
            sdpa = att._prefill(
                q, qkv[r0 : r0 + n, qd : qd + kvd].view(n, kv_heads, head_dim),
                qkv[r0 : r0 + n, qd + kvd :].view(n, kv_heads, head_dim), ctx, t,
            ).float()  # fmt: skip
        err, err_sdpa = (ours - ref).abs(), (sdpa - ref).abs()
        # bf16 P and one bf16 rounding of the output, as SDPA's own bf16 path
        assert err.max() <= 0.03, (ctx, n, err.max().item(), err_sdpa.max().item())
        assert err.mean() <= 1.5 * err_sdpa.mean() + 1e-4, (err.mean(), err_sdpa.mean())

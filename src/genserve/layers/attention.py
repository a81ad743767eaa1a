"""Paged attention on CPU: K/V live in fixed-size blocks addressed by block tables."""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from genserve.engine.forward_context import ForwardContext, get_forward_context


class PagedAttention(nn.Module):
    """Writes this step's K/V into the layer's cache, then attends over each sequence's context.

    The runner binds `k_cache`/`v_cache`: [num_blocks, block_size, num_kv_heads, head_dim].
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.k_cache: torch.Tensor = torch.empty(0)
        self.v_cache: torch.Tensor = torch.empty(0)
        # the native kernel library (kernels/decode_bf16.c) for bf16 decode rows, bound by the
        # model runner when native kernels are enabled; None runs SDPA over gathered blocks
        self.native: ctypes.CDLL | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D] -> [T, H*D]."""
        ctx = get_forward_context()
        kc = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)
        vc = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)
        kc.index_copy_(0, ctx.slot_mapping, k)
        vc.index_copy_(0, ctx.slot_mapping, v)
        out = torch.empty_like(q)
        if ctx.num_decode:
            out[: ctx.num_decode] = self._decode(q[: ctx.num_decode], ctx)
        for p in ctx.prefills:
            rows = slice(p.token_start, p.token_start + p.num_tokens)
            out[rows] = self._prefill(q[rows], k[rows], v[rows], p.context_len, p.block_table)
        return out.view(q.shape[0], -1)

    def _gather(self, cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
        # [..., blocks] -> [..., blocks*block_size, KVH, D] truncated to `length`
        g = cache[block_table]
        g = g.view(*block_table.shape[:-1], -1, self.num_kv_heads, self.head_dim)
        return g[..., :length, :, :]

    def _decode(self, q: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """One query per sequence, all sequences in one SDPA call with a length mask.

        GQA without copying K/V: the G query heads sharing a KV head become G "query rows" of
        that head (HF layout: query head h reads KV head h // G)."""
        assert ctx.decode_block_tables is not None and ctx.decode_context_lens is not None
        if self.native is not None and q.dtype == torch.bfloat16:
            q = q.contiguous()
            out = torch.empty_like(q)
            row = self.num_heads * self.head_dim
            if self.decode_native(self.native, q, row, out, row, ctx) == 0:
                return out
        n, s = q.shape[0], ctx.decode_max_context
        group = self.num_heads // self.num_kv_heads
        k = self._gather(self.k_cache, ctx.decode_block_tables, s).transpose(1, 2)
        v = self._gather(self.v_cache, ctx.decode_block_tables, s).transpose(1, 2)
        mask = torch.arange(s).unsqueeze(0) < ctx.decode_context_lens.unsqueeze(1)  # [N, S]
        o = F.scaled_dot_product_attention(
            q.view(n, self.num_kv_heads, group, self.head_dim),
            k,  # [N, KVH, S, D]
            v,
            attn_mask=mask[:, None, None, :],
            scale=self.scale,
        )  # [N, KVH, G, D]
        return o.reshape(n, self.num_heads, self.head_dim)

    def decode_native(
        self, lib: ctypes.CDLL, q: torch.Tensor, ldq: int, out: torch.Tensor, ldo: int,
        ctx: ForwardContext,
    ) -> int:  # fmt: skip
        """The native kernel (kernels/decode_bf16.c) for the `ctx.num_decode` decode rows: K/V
        read straight from the blocks, no gather copy, each KV head once per row. q and out are
        bf16 rows of H*D at strides ldq and ldo; returns the kernel's code (0: done)."""
        tables, lens = ctx.decode_block_tables, ctx.decode_context_lens
        return lib.genserve_paged_decode_attention_bf16(
            q.data_ptr(), ldq, out.data_ptr(), ldo, self.k_cache.data_ptr(),
            self.v_cache.data_ptr(), tables.data_ptr(), tables.shape[1], lens.data_ptr(),
            ctx.decode_max_context, ctx.num_decode, self.num_heads, self.num_kv_heads,
            self.head_dim, self.k_cache.shape[1], self.scale,
        )  # fmt: skip

    def _prefill(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        context_len: int,
        block_table: torch.Tensor,
    ) -> torch.Tensor:
        """Causal attention of a chunk of `n` queries over `context_len` keys (cached + new)."""
        n = q.shape[0]
        start = context_len - n
        if start == 0:
            k, v = k_new, v_new
        else:
            k = self._gather(self.k_cache, block_table, context_len)
            v = self._gather(self.v_cache, block_table, context_len)
        group = self.num_heads // self.num_kv_heads
        if group > 1:  # expanded K/V keep SDPA on its fused (flash) CPU kernel
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        # [1, H, n|L, D]: the fused CPU kernel wants 4-D inputs (3-D falls back to math)
        qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        if start == 0:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale)
        else:
            # query i sits at absolute position start+i and sees keys 0..start+i
            mask = torch.arange(context_len).unsqueeze(0) <= (torch.arange(n).unsqueeze(1) + start)
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=self.scale)
        return o.squeeze(0).transpose(0, 1)

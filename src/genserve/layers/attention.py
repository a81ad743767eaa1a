"""Paged attention on CPU: K/V live in fixed-size blocks addressed by block tables.

From the stacked q|k|v projection to the attended rows: q/k norm (Qwen3), rotary, the K/V cache
write, then decode rows and prefill chunks. bf16 with native kernels bound (`lib`): one native
pass for norm + rotary + write (`kernels/small_ops.qkv_post`), native decode attention over the
blocks, native prefill attention (AMX tiles in the AMX build); PyTorch (SDPA) otherwise.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from genserve.engine.forward_context import ForwardContext, get_forward_context
from genserve.kernels import attention as native_attention
from genserve.kernels import small_ops
from genserve.layers.basic import RMSNorm, RotaryEmbedding


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
        # native kernels (bf16 rows), bound by the model; None: PyTorch ops, SDPA over gathers
        self.lib: ctypes.CDLL | None = None

    def forward(
        self, qkv: torch.Tensor, cos_sin: torch.Tensor, q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """qkv: [T, (H + 2 KVH) D] (decode rows first), cos_sin: [T, D] fp32 -> [T, H*D]."""
        ctx = get_forward_context()
        if self.lib is not None and qkv.dtype == torch.bfloat16:
            return self._native(qkv.contiguous(), cos_sin.contiguous(), q_norm, k_norm, ctx)
        t, d = qkv.shape[0], self.head_dim
        q, k, v = qkv.split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], -1)
        q, k, v = q.view(t, -1, d), k.view(t, -1, d), v.view(t, -1, d)
        if q_norm is not None and k_norm is not None:
            q, k = q_norm(q), k_norm(k)
        q, k = RotaryEmbedding.apply(q, cos_sin), RotaryEmbedding.apply(k, cos_sin)
        return self.attend(q, k, v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D] (normed, rotated) -> [T, H*D]."""
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

    def _native(
        self, qkv: torch.Tensor, cos_sin: torch.Tensor, q_norm: RMSNorm | None,
        k_norm: RMSNorm | None, ctx: ForwardContext,
    ) -> torch.Tensor:  # fmt: skip
        lib, heads, kv_heads, d = self.lib, self.num_heads, self.num_kv_heads, self.head_dim
        q_size, kv_size = heads * d, kv_heads * d
        small_ops.qkv_post(
            lib, qkv=qkv, num_heads=heads, num_kv_heads=kv_heads, head_dim=d, cos_sin=cos_sin,
            q_norm=None if q_norm is None else q_norm.weight,
            k_norm=None if k_norm is None else k_norm.weight,
            eps=q_norm.eps if q_norm is not None else 0.0, k_cache=self.k_cache,
            v_cache=self.v_cache, slot_mapping=ctx.slot_mapping,
        )  # fmt: skip
        out = torch.empty(qkv.shape[0], q_size, dtype=qkv.dtype)
        if ctx.num_decode and self.decode_native(qkv[:, :q_size], out, ctx):
            raise RuntimeError("native paged attention failed (out of memory?)")
        if ctx.prefills and not self._prefill_native(qkv, out, ctx):
            for p in ctx.prefills:
                rows = slice(p.token_start, p.token_start + p.num_tokens)
                q, k, v = qkv[rows].split([q_size, kv_size, kv_size], dim=-1)
                o = self._prefill(q.view(-1, heads, d), k.view(-1, kv_heads, d),
                                  v.view(-1, kv_heads, d), p.context_len, p.block_table)  # fmt: skip
                out[rows] = o.reshape(p.num_tokens, q_size)
        return out

    def _prefill_native(self, qkv: torch.Tensor, out: torch.Tensor, ctx: ForwardContext) -> bool:
        """The native prefill kernel for every chunk of the step; False where it declined (SDPA
        then attends)."""
        chunks = ctx.native_prefill
        if chunks is None:  # built once a step, shared by every layer
            chunks = ctx.native_prefill = native_attention.PrefillChunks.of(ctx.prefills)
        return not native_attention.prefill(
            self.lib, qkv=qkv, out=out, k_cache=self.k_cache, v_cache=self.v_cache,
            chunks=chunks, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            scale=self.scale,
        )  # fmt: skip

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
        if self.lib is not None and q.dtype == torch.bfloat16:
            q = q.contiguous().view(q.shape[0], -1)
            out = torch.empty_like(q)
            if self.decode_native(q, out, ctx) == 0:
                return out.view(q.shape[0], self.num_heads, self.head_dim)
            q = q.view(q.shape[0], self.num_heads, self.head_dim)
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

    def decode_native(self, q: torch.Tensor, out: torch.Tensor, ctx: ForwardContext) -> int:
        """The native kernel for the `ctx.num_decode` decode rows of q and out ([rows, H*D] bf16,
        any row stride): K/V read straight from the blocks, no gather copy, each KV head once per
        row. Returns the kernel's code (0: done)."""
        return native_attention.paged_decode(
            self.lib, q=q[: ctx.num_decode], out=out[: ctx.num_decode], k_cache=self.k_cache,
            v_cache=self.v_cache, block_tables=ctx.decode_block_tables, context_lens=ctx.decode_context_lens,
            max_context=ctx.decode_max_context, num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, scale=self.scale,
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

"""Typed wrappers of the native paged attention kernels: decode rows
(`genserve_paged_decode_attention_bf16`) and prefill chunks (`genserve_prefill_attention_amx`
in the AMX build: scores in tiles; else `genserve_prefill_attention_bf16`, each query attended
as a decode row of its own context). K/V are read straight from the cache blocks (no gather)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch


def paged_decode(
    lib: ctypes.CDLL, *, q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor,
    v_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
    max_context: int, num_heads: int, num_kv_heads: int, scale: float,
) -> int:  # fmt: skip
    """One query per row: q, out [N, H*D] bf16 (row strides free, e.g. views into qkv),
    caches [blocks, block_size, KVH, D], block_tables [N, width] int64, context_lens [N].
    Returns the kernel's code (0: done, else out of memory)."""
    n, block_size, _, head_dim = q.shape[0], *k_cache.shape[1:]
    return lib.genserve_paged_decode_attention_bf16(
        q.data_ptr(), q.stride(0), out.data_ptr(), out.stride(0), k_cache.data_ptr(),
        v_cache.data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
        context_lens.data_ptr(), max_context, n, num_heads, num_kv_heads, head_dim, block_size,
        scale,
    )  # fmt: skip


@dataclass(slots=True)
class PrefillChunks:
    """A step's prefill chunks as the native prefill kernel reads them (built once a step)."""

    tables: torch.Tensor  # [chunks, width] int64, 0-padded block tables
    meta: torch.Tensor  # [3, chunks] int64: first row, rows, context length

    @staticmethod
    def of(prefills: list) -> PrefillChunks:
        width = max(p.block_table.numel() for p in prefills)
        tables = torch.zeros(len(prefills), width, dtype=torch.int64)
        for i, p in enumerate(prefills):
            tables[i, : p.block_table.numel()] = p.block_table
        meta = torch.tensor(
            [[p.token_start for p in prefills], [p.num_tokens for p in prefills],
             [p.context_len for p in prefills]],
            dtype=torch.int64,
        )  # fmt: skip
        return PrefillChunks(tables, meta)


def prefill(
    lib: ctypes.CDLL, *, qkv: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor,
    v_cache: torch.Tensor, chunks: PrefillChunks, num_heads: int, num_kv_heads: int,
    scale: float,
) -> int:  # fmt: skip
    """Causal attention of every chunk's rows of qkv [T, (H + 2 KVH) D] over its cached
    context (its own K/V already written) into out [T, H*D]; 0 when done, else nothing is
    promised and the caller attends another way."""
    block_size, _, head_dim = k_cache.shape[1:]
    m = chunks.meta
    kernel = (
        getattr(lib, "genserve_prefill_attention_amx", None) or lib.genserve_prefill_attention_bf16
    )
    return kernel(
        qkv.data_ptr(), qkv.stride(0), out.data_ptr(), out.stride(0), k_cache.data_ptr(),
        v_cache.data_ptr(), chunks.tables.data_ptr(), chunks.tables.shape[1], m[0].data_ptr(),
        m[1].data_ptr(), m[2].data_ptr(), m.shape[1], num_heads, num_kv_heads, head_dim,
        block_size, scale,
    )  # fmt: skip

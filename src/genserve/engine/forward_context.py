"""Attention metadata for the current forward pass, set for the scope of one step.

The flat "varlen" batch holds `num_decode` single-token rows first (batched attention), then
the multi-token rows (prefill chunks), each attending to its whole context through the cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(slots=True)
class PrefillSeq:
    token_start: int  # first row of this sequence in the flat batch
    num_tokens: int  # query length this step
    context_len: int  # tokens in the cache after this step (cached prefix + new)
    block_table: torch.Tensor  # [num_blocks] int64


@dataclass(slots=True)
class ForwardContext:
    slot_mapping: torch.Tensor  # [T] int64: cache slot for each new token's K/V
    num_decode: int  # rows [0, num_decode) are single-token queries
    decode_block_tables: torch.Tensor | None  # [num_decode, max_blocks] int64, 0-padded
    decode_context_lens: torch.Tensor | None  # [num_decode] int64
    decode_max_context: int
    prefills: list[PrefillSeq]
    seq_ends: list[int]  # per sequence (decode rows first): total length after this step
    # the prefill chunks as the native prefill kernel reads them, built by the first layer
    native_prefill: Any = None


_current: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    assert _current is not None, "attention called outside forward_context()"
    return _current


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    global _current
    prev, _current = _current, ctx
    try:
        yield ctx
    finally:
        _current = prev

"""Linear layers with oneDNN-prepacked bfloat16 weights for batched rows on CPU.

`F.linear` on a bf16 CPU tensor reorders the weight into oneDNN's blocked layout on every call;
for the 9-256 row matmuls of a batched decode step that reorder costs as much as the multiply
(SmolLM2-135M, 32 rows, 2 threads: 16.9 ms of matmuls per step plain, 9.6 ms prepacked; at 512+
rows the two are even, so larger inputs keep the plain path). The packed copy sits beside the
plain weight, which the fused decode kernel and large prefill chunks still read: packing costs
one extra copy of the linear weights, so it is skipped when that would not fit comfortably.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# rows up to which the packed weight is used (measured: packed wins up to 128-256 rows)
PACKED_MAX_ROWS = 256
# the batch-size hint oneDNN packs for (the middle of the decode range)
PACK_HINT_ROWS = 32


class Linear(nn.Linear):
    """nn.Linear that uses `packed` (set by `pack_linear_weights`) for 2-D inputs of few rows."""

    packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.dim() == 2 and x.shape[0] <= PACKED_MAX_ROWS:
            return packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_HINT_ROWS)


def packing_supported(dtype: torch.dtype) -> bool:
    if dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pack_linear_weights(model: nn.Module, budget_bytes: int) -> int:
    """Packs every `Linear` of `model` and its output projection (`lm_head_weight()`, stored as
    `model.packed_lm_head`) when their weights fit `budget_bytes` in total; returns the bytes
    packed (0 when skipped)."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    head = model.lm_head_weight() if hasattr(model, "lm_head_weight") else None
    weights = [m.weight for m in linears] + ([head] if head is not None else [])
    total = sum(w.numel() * w.element_size() for w in weights)
    if not linears or total > budget_bytes:
        if linears:
            log.info("not prepacking %.0f MiB of linear weights (budget %.0f MiB)",
                     total / 2**20, budget_bytes / 2**20)  # fmt: skip
        return 0
    for m in linears:
        m.packed = pack(m.weight)
    if head is not None:
        model.packed_lm_head = pack(head)
    return total

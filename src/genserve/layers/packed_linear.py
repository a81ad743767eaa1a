"""Linear layers on CPU, their bf16 matmul chosen by kernel set (`LINEAR_KERNELS`), never by
the row count, so that a row's output does not depend on the rows beside it.

`F.linear` on a bf16 CPU tensor reorders the weight into oneDNN's blocked layout on every call,
picks its blocking by the row count, and on CPUs without AVX512-BF16 falls back to a slow
scalar path. Instead:

- `amx`: each weight is packed once into AMX tiles (`kernels/amx_linear.c`); the tiles
  accumulate each output element over K in a fixed order at any row count. SmolLM2-135M, 32
  rows, 2 threads, every linear of a step (distinct weights, as in the model): 13.5 ms, against
  33 ms for oneDNN on prepacked weights. Prefill chunks take the same path;
- `avx512-bf16`: oneDNN on weights packed once into its layout. Against `genserve_gemm_bf16` on
  the plain weights, SmolLM2-135M's four linears of a layer, 2 threads (Xeon Sapphire Rapids
  with oneDNN held to AVX512_CORE_BF16, busy machine, best of 12), ms, gemm | oneDNN: M=1 0.70 |
  2.45, 2 0.54 | 2.57, 4 2.26 | 1.32, 8 1.57 | 0.35, 32 8.1 | 0.68, 128 30.5 | 1.06: the gemm
  (as it is today) wins only where the fused layer kernel takes the step anyway (1-2 decode
  rows). Both give the same bf16 outputs at every row count (tests/engine/test_batch_invariance);
- `avx2-fma`: `genserve_gemm_bf16` on the plain weights (one fp32 dot product per output
  element, the same order at any row count): AVX2 has no oneDNN bf16 path;
- `torch`: F.linear.

The packed
copy sits beside the plain weight, which the fused decode layer still reads: packing costs one
extra copy of the linear weights, so it is skipped when that would not fit comfortably.
"""

from __future__ import annotations

import ctypes
import logging

import torch
import torch.nn.functional as F
from torch import nn

from genserve import hugepages
from genserve.kernels import load_amx_linear
from genserve.kernels.gemm import gemm_bf16
from genserve.layers.basic import silu_and_mul

log = logging.getLogger(__name__)

# the batch-size hint oneDNN packs for (the middle of the decode range)
PACK_HINT_ROWS = 32


class PackedWeight:
    """One [N, K] bf16 weight, packed; `__call__(x, bias, out_f32)` = F.linear(x, W, bias)."""

    def __init__(
        self, weight: torch.Tensor, out: torch.Tensor | None = None, amx: bool = True
    ) -> None:
        """`out`: where to put the AMX packing (`weight.numel()` elements of its dtype);
        `amx=False`: oneDNN's layout even where AMX could take the weight."""
        self.weight = weight.detach()  # the module's own storage: the fallback
        self.n, self.k = weight.shape
        lib = load_amx_linear()
        if amx and self.amx_packable(weight):
            self.amx = lib
            self.data = torch.empty_like(self.weight) if out is None else out.view_as(weight)
            lib.genserve_amx_pack_bf16(self.weight.data_ptr(), self.data.data_ptr(), self.n, self.k)
        else:
            self.amx = None
            self.data = torch.ops.mkldnn._reorder_linear_weight(self.weight, PACK_HINT_ROWS)

    def __call__(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, out_f32: bool = False
    ) -> torch.Tensor:
        x = x.contiguous()
        if self.amx is not None:
            m = x.shape[0]
            y = torch.empty(m, self.n, dtype=torch.float32 if out_f32 else torch.bfloat16)
            rc = self.amx.genserve_amx_linear_bf16(
                x.data_ptr(), self.k, self.data.data_ptr(),
                None if bias is None else bias.data_ptr(), y.data_ptr(), self.n, m, self.n,
                self.k, int(out_f32),
            )  # fmt: skip
            if rc == 0:
                return y
            y = F.linear(x, self.weight, bias)  # out of memory for the padded rows
        else:
            y = torch.ops.mkldnn._linear_pointwise(x, self.data, bias, "none", [], "")
        return y.float() if out_f32 else y

    def argmax(
        self, x: torch.Tensor, n_valid: int, logprobs: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(`F.linear(x, W).float()[:, :n_valid].argmax(1)` as `argmax_rows` chooses it, and
        with `logprobs` the chosen values' log_softmax, else None), without the logits: one
        pass over the AMX packing. None where the weight has no AMX packing."""
        if self.amx is None or x.dim() != 2 or not 0 < n_valid <= self.n:
            return None
        x = x.contiguous()
        ids = torch.empty(x.shape[0], dtype=torch.long)
        lps = torch.empty(x.shape[0], dtype=torch.float32) if logprobs else None
        rc = self.amx.genserve_amx_linear_argmax_bf16(
            x.data_ptr(), self.k, self.data.data_ptr(), x.shape[0], self.n, self.k, n_valid,
            ids.data_ptr(), None if lps is None else lps.data_ptr(),
        )  # fmt: skip
        return (ids, lps) if rc == 0 else None

    def glu(self, x: torch.Tensor) -> torch.Tensor | None:
        """For the stacked gate and up projections ([2 I, K]): bf16(bf16(silu(g)) * u) of
        [g | u] = this linear's output, [M, I], in one pass (exactly `genserve_silu_mul_bf16`
        of `self(x)`). None where the weight has no AMX packing."""
        if self.amx is None or x.dim() != 2 or self.n % 32:
            return None
        x = x.contiguous()
        inter = self.n // 2
        act = torch.empty(x.shape[0], inter, dtype=torch.bfloat16)
        rc = self.amx.genserve_amx_glu_bf16(
            x.data_ptr(), self.k, self.data.data_ptr(), act.data_ptr(), inter, x.shape[0], inter,
            self.k,
        )  # fmt: skip
        return act if rc == 0 else None

    @staticmethod
    def amx_packable(weight: torch.Tensor) -> bool:
        n, k = weight.shape
        return load_amx_linear() is not None and n % 16 == 0 and k % 32 == 0

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


# kernel set -> the bf16 matmul its linears run (see the module docstring for the measurements)
LINEAR_KERNELS: dict[str, str] = {
    "amx": "amx",  # AMX tiles on prepacked weights, every row count
    "avx512-bf16": "onednn",  # oneDNN on prepacked weights (1-2 row decode: the layer kernel)
    "avx2-fma": "gemm",
    "torch": "torch",  # F.linear
}


class Linear(nn.Linear):
    """nn.Linear whose bf16 matmul is its kernel set's (`LINEAR_KERNELS`): `packed` (set by
    `pack_linear_weights`), else `genserve_gemm_bf16` where `lib` is bound, else F.linear. The
    choice never depends on the row count: a row's output is the same in any batch."""

    packed: PackedWeight | None = None
    lib: ctypes.CDLL | None = None  # native kernels (gemm, silu_mul), bound by the model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.dtype == torch.bfloat16:
            if self.packed is not None:
                return self.packed(x, self.bias)
            if self.lib is not None:
                return gemm_bf16(self.lib, x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def glu(self, x: torch.Tensor) -> torch.Tensor:
        """silu_and_mul of this (stacked gate|up, [2 I, K]) projection of x -> [M, I]: in one
        pass on the AMX packing where there is one (the same bf16 values), else the linear
        then `silu_and_mul`."""
        if self.packed is not None and x.dim() == 2:
            out = self.packed.glu(x)
            if out is not None:
                return out
        return silu_and_mul(self(x), self.lib)


def packing_supported(dtype: torch.dtype) -> bool:
    if dtype != torch.bfloat16:
        return False
    if load_amx_linear() is not None:
        return True
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pack_linear_weights(model: nn.Module, budget_bytes: int, kind: str = "any") -> int:
    """Packs every `Linear` of `model` and its output projection (`lm_head_weight()`, stored as
    `model.packed_lm_head`) when their weights fit `budget_bytes` in total; returns the bytes
    packed (0 when skipped). `kind`: "amx" (AMX tiles where the shape allows, else the weight
    stays plain), "onednn" (oneDNN's layout), "any" (AMX tiles, else oneDNN's layout)."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    head = model.lm_head_weight() if hasattr(model, "lm_head_weight") else None
    weights = [m.weight for m in linears] + ([head] if head is not None else [])
    total = sum(w.numel() * w.element_size() for w in weights)
    if not linears or total > budget_bytes:
        if linears:
            log.info("not prepacking %.0f MiB of linear weights (budget %.0f MiB)",
                     total / 2**20, budget_bytes / 2**20)  # fmt: skip
        return 0
    # AMX packings share one arena on huge pages, in the order a step reads them
    amx = [w for w in weights if kind != "onednn" and PackedWeight.amx_packable(w)]
    arena = hugepages.empty((sum(w.numel() for w in amx),), weights[0].dtype) if amx else None
    offset = 0

    def pack(w: torch.Tensor) -> PackedWeight:
        nonlocal offset
        if arena is None or not PackedWeight.amx_packable(w):
            return None if kind == "amx" else PackedWeight(w, amx=False)
        offset += w.numel()
        return PackedWeight(w, arena[offset - w.numel() : offset])

    for m in linears:
        m.packed = pack(m.weight)
    if head is not None:
        model.packed_lm_head = pack(head)
    return total

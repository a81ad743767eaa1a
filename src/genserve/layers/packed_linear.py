"""Linear layers on CPU, their bf16 matmul chosen by kernel set (`LINEAR_KERNELS`), never by
the row count, so that a row's output does not depend on the rows beside it.

`F.linear` on a bf16 CPU tensor reorders the weight into oneDNN's blocked layout on every call,
picks its blocking by the row count, and on CPUs without AVX512-BF16 falls back to a slow
scalar path. Instead each weight is packed once, at load, for one kernel family (`Packing`):

- `amx` set: AMX tiles (`kernels/amx_linear.c`); the tiles accumulate each output element over
  K in a fixed order at any row count. SmolLM2-135M, 32 rows, 2 threads, every linear of a step:
  13.5 ms, against 33 ms for oneDNN on prepacked weights. A shape the tiles do not take (N not a
  multiple of 16, K of 32) goes to the panels;
- `avx512-bf16` and `avx2-fma` sets: K-major panels of 16 output columns
  (`kernels/panel_linear.c`): one register-blocked micro-kernel for every row count, each output
  element one fp32 chain over K in order (AVX2: an FMA per k on weights widened in registers;
  AVX-512: vdpbf16ps per fixed pair of k). Xeon Sapphire Rapids, one thread, K=576 N=3072,
  GFLOP/s, panel | MKL fp32 sgemm: avx2-fma M=32 69 | 113, M=512 67 | 161 (MKL on AVX-512 here;
  this core's AVX2 FMA peak is ~82), avx512-bf16 M=32 113 | 117, M=512 102 | 162; M=1 streams
  the weight at memory speed (`bench/kernels_gemm.py`);
- `torch`: F.linear.

Both families also give the MLP's gate and up projections with SiLU * up in the epilogue
(`glu`) and, for the output projection of an all-greedy step, each row's argmax and its logprob
without writing the logits (`argmax`). The packed copy sits beside the plain weight, which the
fused decode layer still reads: packing costs one extra copy of the linear weights, so it is
skipped when that would not fit comfortably.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genserve import hugepages
from genserve.kernels import load_amx_linear
from genserve.kernels.gemm import gemm_bf16
from genserve.layers.basic import silu_and_mul

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Packing:
    """One packed-weight kernel family. Its four functions share signatures across families
    (the whole-stack decode kernel takes `linear` and `glu` as function pointers)."""

    name: str  # "amx" or "panel"
    lib: ctypes.CDLL
    prefix: str  # the C functions' prefix: genserve_amx_ or genserve_panel_

    def fn(self, what: str):  # noqa: ANN201 - a ctypes function
        return getattr(self.lib, f"{self.prefix}{what}")

    def takes(self, n: int, k: int) -> bool:
        return self.name == "panel" or (n % 16 == 0 and k % 32 == 0)

    def size(self, n: int, k: int) -> int:
        """Elements of the packing of an [n, k] weight."""
        if self.name == "panel":
            return int(self.lib.genserve_panel_packed_size(n, k))
        return n * k

    @staticmethod
    def amx() -> Packing | None:
        lib = load_amx_linear()
        return None if lib is None else Packing("amx", lib, "genserve_amx_")

    @staticmethod
    def panel(lib: ctypes.CDLL) -> Packing:
        return Packing("panel", lib, "genserve_panel_")


class PackedWeight:
    """One [N, K] bf16 weight, packed; `__call__(x, bias, out_f32)` = F.linear(x, W, bias)."""

    def __init__(self, weight: torch.Tensor, packing: Packing, out: torch.Tensor | None = None):
        """`out`: where to put the packing (`packing.size(N, K)` elements of bf16)."""
        self.weight = weight.detach()  # the module's own storage: the fallback
        self.n, self.k = weight.shape
        self.packing = packing
        size = packing.size(self.n, self.k)
        self.data = torch.empty(size, dtype=torch.bfloat16) if out is None else out[:size]
        packing.fn("pack_bf16")(self.weight.data_ptr(), self.data.data_ptr(), self.n, self.k)
        # looked up once: these run on every step
        self._linear = packing.fn("linear_bf16")
        self._argmax = packing.fn("linear_argmax_bf16")
        self._glu = packing.fn("glu_bf16")

    def __call__(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, out_f32: bool = False
    ) -> torch.Tensor:
        x = x.contiguous()
        m = x.shape[0]
        y = torch.empty(m, self.n, dtype=torch.float32 if out_f32 else torch.bfloat16)
        rc = self._linear(
            x.data_ptr(), self.k, self.data.data_ptr(), None if bias is None else bias.data_ptr(),
            y.data_ptr(), self.n, m, self.n, self.k, int(out_f32),
        )  # fmt: skip
        if rc == 0:
            return y
        y = F.linear(x, self.weight, bias)  # the kernel's buffers did not fit in memory
        return y.float() if out_f32 else y

    def argmax(
        self, x: torch.Tensor, n_valid: int, logprobs: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(`F.linear(x, W).float()[:, :n_valid].argmax(1)` as `argmax_rows` chooses it, and
        with `logprobs` the chosen values' log_softmax, else None), without the logits: one
        pass over the packing. None where the kernel declines."""
        if x.dim() != 2 or not 0 < n_valid <= self.n:
            return None
        x = x.contiguous()
        ids = torch.empty(x.shape[0], dtype=torch.long)
        lps = torch.empty(x.shape[0], dtype=torch.float32) if logprobs else None
        rc = self._argmax(
            x.data_ptr(), self.k, self.data.data_ptr(), x.shape[0], self.n, self.k, n_valid,
            ids.data_ptr(), None if lps is None else lps.data_ptr(),
        )  # fmt: skip
        return (ids, lps) if rc == 0 else None

    def glu(self, x: torch.Tensor) -> torch.Tensor | None:
        """For the stacked gate and up projections ([2 I, K]): bf16(bf16(silu(g)) * u) of
        [g | u] = this linear's output, [M, I], in one pass (exactly `genserve_silu_mul_bf16`
        of `self(x)`). None where the kernel declines the shape (I not a multiple of 16)."""
        if x.dim() != 2 or self.n % 32:
            return None
        x = x.contiguous()
        inter = self.n // 2
        act = torch.empty(x.shape[0], inter, dtype=torch.bfloat16)
        rc = self._glu(
            x.data_ptr(), self.k, self.data.data_ptr(), act.data_ptr(), inter, x.shape[0], inter,
            self.k,
        )  # fmt: skip
        return act if rc == 0 else None

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


# kernel set -> the packing its linears run on (see the module docstring for the measurements)
LINEAR_KERNELS: dict[str, str] = {
    "amx": "amx",  # AMX tiles, every row count (panels for shapes the tiles do not take)
    "avx512-bf16": "panel",
    "avx2-fma": "panel",
    "torch": "torch",  # F.linear
}


class Linear(nn.Linear):
    """nn.Linear whose bf16 matmul is its kernel set's (`LINEAR_KERNELS`): `packed` (set by
    `pack_linear_weights`), else `genserve_gemm_bf16` on the plain weight where `lib` is bound
    (the packing did not fit its budget), else F.linear. The choice never depends on the row
    count: a row's output is the same in any batch."""

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
        pass on the packing where there is one (the same bf16 values), else the linear then
        `silu_and_mul`."""
        if self.packed is not None and x.dim() == 2:
            out = self.packed.glu(x)
            if out is not None:
                return out
        return silu_and_mul(self(x), self.lib)


def pack_linear_weights(model: nn.Module, budget_bytes: int, packings: list[Packing]) -> int:
    """Packs every `Linear` of `model` and its output projection (`lm_head_weight()`, stored as
    `model.packed_lm_head`), each for the first of `packings` that takes its shape, when they
    fit `budget_bytes` in total; returns the bytes packed (0 when skipped)."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    head = model.lm_head_weight() if hasattr(model, "lm_head_weight") else None
    weights = [m.weight for m in linears] + ([head] if head is not None else [])

    def packing_of(w: torch.Tensor) -> Packing | None:
        return next((p for p in packings if p.takes(*w.shape)), None)

    sizes = [packing_of(w).size(*w.shape) if packing_of(w) else 0 for w in weights]
    total = 2 * sum(sizes)
    if not linears or not total or total > budget_bytes:
        if linears and total:
            log.info("not prepacking %.0f MiB of linear weights (budget %.0f MiB)",
                     total / 2**20, budget_bytes / 2**20)  # fmt: skip
        return 0
    # the packings share one arena on huge pages, in the order a step reads them
    arena = hugepages.empty((sum(sizes),), torch.bfloat16)
    offset = 0

    def pack(w: torch.Tensor, size: int) -> PackedWeight | None:
        nonlocal offset
        packing = packing_of(w)
        if packing is None:
            return None
        offset += size
        return PackedWeight(w, packing, arena[offset - size : offset])

    for m, size in zip(linears, sizes, strict=False):
        m.packed = pack(m.weight, size)
    if head is not None:
        model.packed_lm_head = pack(head, sizes[-1])
    return total

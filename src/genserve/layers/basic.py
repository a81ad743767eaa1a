"""Small building blocks: RMSNorm (with the fused residual add), SwiGLU activation, rotary
position embeddings. In bf16, where the model is bound to native kernels (`lib`), RMSNorm and
SwiGLU run `kernels/small_ops.py` with the PyTorch ops' rounding; PyTorch ops otherwise."""

from __future__ import annotations

import ctypes
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genserve.kernels import small_ops


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich, 2019), computed in float32 as transformers does.

    `norm(x)` -> normed; `norm(x, residual)` (vLLM style) -> (normed, residual): the new
    residual is residual + x (natively: updated in place), normed its norm."""

    lib: ctypes.CDLL | None = None  # native kernels (bf16), bound by the model

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        native = self.lib is not None and x.dtype == torch.bfloat16 and x.dim() == 2
        if residual is None:
            if not native:
                return self._norm(x)
            x = x.contiguous()
        elif not native:
            residual = residual + x
            return self._norm(residual), residual
        # [T, hidden]: the residual add in place on the stream and the norm in one pass
        out = torch.empty_like(x)
        stream = x if residual is None else residual
        small_ops.add_rmsnorm(self.lib, x=stream, delta=None if residual is None else x,
                              weight=self.weight, out=out, eps=self.eps)  # fmt: skip
        return out if residual is None else (out, stream)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def silu_and_mul(x: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """SwiGLU (Shazeer, 2020) over a packed [.., 2*I] gate_up projection."""
    if lib is not None and x.dtype == torch.bfloat16 and x.dim() == 2 and x.is_contiguous():
        return small_ops.silu_mul(lib, gate_up=x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _default_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling of the rotary frequencies."""
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings (Su et al., 2021), "rotate half" layout as in HF checkpoints.

    Supports `rope_scaling` types linear, llama3 (static tables) and dynamic (NTK-aware: a
    sequence longer than the original context uses a base stretched for its length).
    """

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float,
        scaling: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.scaling = scaling or {}
        self.kind = self.scaling.get("rope_type")
        if self.kind not in (None, "linear", "llama3", "dynamic"):
            raise ValueError(f"unsupported rope_scaling type {self.kind!r}")
        inv_freq = _default_inv_freq(head_dim, base)
        if self.kind == "linear":
            inv_freq = inv_freq / float(self.scaling["factor"])
        elif self.kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, self.scaling)
        self.max_position = max_position
        self.register_buffer("cos_sin", self._table(inv_freq, max_position), persistent=False)

    @staticmethod
    def _table(inv_freq: torch.Tensor, length: int) -> torch.Tensor:
        # [length, head_dim] = cos(half) | sin(half), float32
        t = torch.arange(length, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1).float()

    def _dynamic_table(self, seq_len: int) -> torch.Tensor:
        factor = float(self.scaling["factor"])
        orig = int(self.scaling.get("original_max_position_embeddings", self.max_position))
        base = self.base * ((factor * seq_len / orig) - (factor - 1)) ** (
            self.head_dim / (self.head_dim - 2)
        )
        return self._table(_default_inv_freq(self.head_dim, base), seq_len)

    def cos_sin_for(self, positions: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
        """[T, head_dim] cos|sin rows for `positions`; `seq_len` only matters for dynamic NTK."""
        if self.kind == "dynamic" and seq_len is not None:
            orig = int(self.scaling.get("original_max_position_embeddings", self.max_position))
            if seq_len > orig:
                return self._dynamic_table(seq_len)[positions]
        return self.cos_sin[positions]

    @staticmethod
    def apply(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim]; cos_sin: [T, head_dim] float32."""
        half = x.shape[-1] // 2
        cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.to(x.dtype)

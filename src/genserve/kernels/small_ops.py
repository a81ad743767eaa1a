"""Typed wrappers of the native small ops of a bf16 decoder layer (`genserve_add_rmsnorm_bf16`,
`genserve_qkv_post_bf16`, `genserve_silu_mul_bf16`): rounding as the PyTorch layers."""

from __future__ import annotations

import ctypes

import torch


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def add_rmsnorm(
    lib: ctypes.CDLL, *, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
    out: torch.Tensor, eps: float,
) -> None:  # fmt: skip
    """x = bf16(x + delta) in place (the residual add, skipped without delta), then
    out = RMSNorm(x) * weight. x, delta, out: contiguous [T, hidden] bf16."""
    t, hid = x.shape
    lib.genserve_add_rmsnorm_bf16(x.data_ptr(), _ptr(delta), weight.data_ptr(), out.data_ptr(),
                                  t, hid, eps)  # fmt: skip


def qkv_post(
    lib: ctypes.CDLL, *, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
    cos_sin: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> None:  # fmt: skip
    """In place on qkv [T, (H + 2 KVH) D] bf16: q/k RMSNorm (where the weights are given),
    rotary with cos_sin [T, D] fp32; then K/V of each row into the caches at its slot [T]."""
    lib.genserve_qkv_post_bf16(
        qkv.data_ptr(), qkv.shape[0], num_heads, num_kv_heads, head_dim, cos_sin.data_ptr(),
        _ptr(q_norm), _ptr(k_norm), eps, k_cache.data_ptr(), v_cache.data_ptr(),
        slot_mapping.data_ptr(),
    )  # fmt: skip


def silu_mul(lib: ctypes.CDLL, *, gate_up: torch.Tensor, out: torch.Tensor | None = None):
    """[T, 2 I] gate|up bf16 -> [T, I] bf16(bf16(silu(g)) * u), as `silu_and_mul`."""
    t, two_i = gate_up.shape
    if out is None:
        out = torch.empty(t, two_i // 2, dtype=gate_up.dtype)
    lib.genserve_silu_mul_bf16(gate_up.data_ptr(), out.data_ptr(), t, two_i // 2)
    return out

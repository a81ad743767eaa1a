"""Typed wrappers of the whole-layer and whole-stack bf16 decode kernels
(`genserve_decode_layer_bf16`, `genserve_decode_stack_bf16`) and the ctypes structs they read.
The structs hold pointers into the model's own parameters and KV caches: nothing is copied."""

from __future__ import annotations

import ctypes

import torch

P = ctypes.c_void_p
I64 = ctypes.c_int64


class LayerWeights(ctypes.Structure):
    _fields_ = [
        *((name, P) for name in ("ln1", "qkv", "qkv_bias", "o", "ln2", "gate_up", "down",
                                 "q_norm", "k_norm")),
        *((name, ctypes.c_int) for name in ("hidden", "num_heads", "num_kv_heads", "head_dim",
                                            "inter")),
        ("eps", ctypes.c_float),
    ]  # fmt: skip


class Scratch(ctypes.Structure):
    _fields_ = [
        *((name, P) for name in ("h", "qkv", "attn", "gu", "act", "scores")),
        ("max_context", I64),
    ]


class StackLayer(ctypes.Structure):
    _fields_ = [(name, P) for name in ("qkv", "o", "gate_up", "down", "k_cache", "v_cache")]


class StackScratch(ctypes.Structure):
    _fields_ = [(name, P) for name in ("h", "qkv", "attn", "o", "gu", "act", "down")]


def _bf16(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, dtype=torch.bfloat16)


def decode_layer(
    lib: ctypes.CDLL, *, weights: LayerWeights, x: torch.Tensor, cos_sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    block_tables: torch.Tensor, context_lens: torch.Tensor, scratch: Scratch,
) -> None:  # fmt: skip
    """One decoder layer for the decode rows x [T, hidden] bf16 (the residual stream, updated
    in place); cos_sin [T, D] fp32; scratch from `layer_scratch`."""
    rc = lib.genserve_decode_layer_bf16(
        ctypes.byref(weights), P(x.data_ptr()), ctypes.c_int(x.shape[0]), P(cos_sin.data_ptr()),
        P(k_cache.data_ptr()), P(v_cache.data_ptr()), P(slot_mapping.data_ptr()),
        P(block_tables.data_ptr()), ctypes.c_int(block_tables.shape[1]),
        P(context_lens.data_ptr()), ctypes.c_int(k_cache.shape[1]), ctypes.byref(scratch),
    )  # fmt: skip
    if rc:
        raise MemoryError("native decode layer: its thread buffers did not fit in memory")


def layer_scratch(cfg, rows: int, max_context: int) -> tuple[Scratch, list[torch.Tensor]]:
    """Scratch for `decode_layer` (and the tensors it points into, to keep alive)."""
    qkv_n = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    buffers = [
        _bf16(rows, cfg.hidden_size), _bf16(rows, qkv_n),
        _bf16(rows, cfg.num_attention_heads * cfg.head_dim),
        _bf16(rows, 2 * cfg.intermediate_size), _bf16(rows, cfg.intermediate_size),
        torch.empty(rows * cfg.num_attention_heads, max_context, dtype=torch.float32),
    ]  # fmt: skip
    return Scratch(*(b.data_ptr() for b in buffers), max_context), buffers


def decode_stack(
    lib: ctypes.CDLL, *, linear: int, glu: int | None, weights, layers, x: torch.Tensor,
    cos_sin: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, max_context: int, block_size: int, scale: float,
    final_norm: torch.Tensor, final_eps: float, out: torch.Tensor,
) -> int:  # fmt: skip
    """Every layer of a pure-decode step in one call: `linear`/`glu` are the AMX kernels'
    addresses, weights/layers arrays of LayerWeights/StackLayer; x [T, hidden] bf16 embeddings
    (updated in place), out the final-normed hidden states. Returns 0, or -1 (no memory)."""
    cfg = weights[0]
    t, hid = x.shape
    widths = (hid, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim,
              cfg.num_heads * cfg.head_dim, hid, 2 * cfg.inter, cfg.inter, hid)  # fmt: skip
    buffers = [_bf16(t, n) for n in widths]
    scratch = StackScratch(*(b.data_ptr() for b in buffers))
    return lib.genserve_decode_stack_bf16(
        P(linear), None if glu is None else P(glu), weights, layers, ctypes.c_int(len(layers)),
        P(x.data_ptr()), ctypes.c_int(t), P(cos_sin.data_ptr()), P(slot_mapping.data_ptr()),
        P(block_tables.data_ptr()), ctypes.c_int(block_tables.shape[1]),
        P(context_lens.data_ptr()), I64(max_context), ctypes.c_int(block_size),
        ctypes.c_float(scale), ctypes.byref(scratch), P(final_norm.data_ptr()),
        ctypes.c_float(final_eps), P(out.data_ptr()),
    )  # fmt: skip

"""Decode steps through the native fused layer kernel (`kernels/decode_bf16.c`).

Used by the model runner for bfloat16 Llama-family models when every row of the step is a
single-token query; anything else (prefill chunks, float32, dynamic rope) runs the PyTorch model.
The kernel reads the model's own parameter and KV-cache storage: nothing is copied.
"""

from __future__ import annotations

import ctypes

import torch

from genserve.engine.forward_context import ForwardContext
from genserve.kernels import load_decode_bf16

P = ctypes.c_void_p
I64 = ctypes.c_int64


class LayerWeights(ctypes.Structure):
    _fields_ = [
        *(
            (name, P)
            for name in (
                "ln1",
                "qkv",
                "qkv_bias",
                "o",
                "ln2",
                "gate_up",
                "down",
                "q_norm",
                "k_norm",
            )
        ),  # fmt: skip
        *(
            (name, ctypes.c_int)
            for name in ("hidden", "num_heads", "num_kv_heads", "head_dim", "inter")
        ),  # fmt: skip
        ("eps", ctypes.c_float),
    ]


class Scratch(ctypes.Structure):
    _fields_ = [
        *((name, P) for name in ("h", "qkv", "attn", "gu", "act", "scores")),
        ("max_context", I64),
    ]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class FusedDecode:
    """Holds ctypes views of one model's weights; `forward` runs a pure-decode step."""

    def __init__(self, model: torch.nn.Module, lib: ctypes.CDLL) -> None:
        cfg = model.config
        self.model = model
        self.lib = lib
        self.cfg = cfg
        self.layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            bias = attn.qkv_proj.bias
            w = LayerWeights(
                _ptr(layer.input_layernorm.weight), _ptr(attn.qkv_proj.weight), _ptr(bias),
                _ptr(attn.o_proj.weight), _ptr(layer.post_attention_layernorm.weight),
                _ptr(mlp.gate_up_proj.weight), _ptr(mlp.down_proj.weight),
                _ptr(attn.q_norm.weight) if attn.qk_norm else None,
                _ptr(attn.k_norm.weight) if attn.qk_norm else None,
                cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                cfg.intermediate_size, cfg.rms_norm_eps,
            )  # fmt: skip
            self.layers.append((w, attn.attn))
        lib.genserve_decode_layer_bf16.restype = None
        lib.genserve_gemm_bf16.restype = None
        embed = model.model.embed_tokens.weight
        self.lm_head = embed if model.lm_head is None else model.lm_head.weight

    @staticmethod
    def create(model: torch.nn.Module, dtype: torch.dtype) -> FusedDecode | None:
        cfg = getattr(model, "config", None)
        if dtype != torch.bfloat16 or cfg is None or cfg.head_dim > 256:
            return None
        if getattr(model, "rotary", None) is None or model.rotary.kind == "dynamic":
            return None
        lib = load_decode_bf16()
        return None if lib is None else FusedDecode(model, lib)

    # Past this many rows the step is compute- rather than bandwidth-bound, and PyTorch's
    # AMX matmuls beat the kernel's AVX512 dot products.
    MAX_ROWS = 8

    @classmethod
    def supports(cls, ctx: ForwardContext) -> bool:
        return not ctx.prefills and 0 < ctx.num_decode <= cls.MAX_ROWS

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> final-normed hidden states [T, hidden] bf16."""
        cfg = self.cfg
        t = input_ids.shape[0]
        x = self.model.model.embed_tokens(input_ids).contiguous()  # [T, hidden]
        cos_sin = self.model.rotary.cos_sin_for(positions).contiguous()  # [T, D] fp32
        qkv_n = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
        bf = torch.bfloat16
        buffers = [
            torch.empty(t, cfg.hidden_size, dtype=bf),
            torch.empty(t, qkv_n, dtype=bf),
            torch.empty(t, cfg.num_attention_heads * cfg.head_dim, dtype=bf),
            torch.empty(t, 2 * cfg.intermediate_size, dtype=bf),
            torch.empty(t, cfg.intermediate_size, dtype=bf),
            torch.empty(t * cfg.num_attention_heads, ctx.decode_max_context, dtype=torch.float32),
        ]
        scratch = Scratch(*(b.data_ptr() for b in buffers), ctx.decode_max_context)
        tables = ctx.decode_block_tables.contiguous()
        lens = ctx.decode_context_lens.contiguous()
        slots = ctx.slot_mapping.contiguous()
        fn = self.lib.genserve_decode_layer_bf16
        for w, attn in self.layers:
            fn(
                ctypes.byref(w), P(x.data_ptr()), ctypes.c_int(t), P(cos_sin.data_ptr()),
                P(attn.k_cache.data_ptr()), P(attn.v_cache.data_ptr()), P(slots.data_ptr()),
                P(tables.data_ptr()), ctypes.c_int(tables.shape[1]), P(lens.data_ptr()),
                ctypes.c_int(attn.k_cache.shape[1]), ctypes.byref(scratch),
            )  # fmt: skip
        return self.model.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] bf16 -> [N, vocab] float32 (fp32 accumulation, no bf16 rounding)."""
        hidden = hidden.contiguous()
        n, k = hidden.shape
        vocab = self.lm_head.shape[0]
        out = torch.empty(n, vocab, dtype=torch.float32)
        self.lib.genserve_gemm_bf16(
            P(self.lm_head.data_ptr()), None, P(hidden.data_ptr()), ctypes.c_int(k),
            P(out.data_ptr()), ctypes.c_int(vocab), ctypes.c_int(n), ctypes.c_int(vocab),
            ctypes.c_int(k), ctypes.c_int(1),
        )  # fmt: skip
        return out

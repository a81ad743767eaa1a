"""bfloat16 steps through the native kernels (`kernels/decode_bf16.c`).

For bfloat16 Llama-family models (not dynamic rope) the model runner sends a pure-decode step
whose linears are all packed for AMX through one native call for every layer
(`forward_stack`); without AMX, a pure-decode step of up to `MAX_ROWS` rows goes through the
fused layer kernel (`forward`). Every other step goes through `forward_mixed`: matmuls on
prepacked weights, native everything else. float32 runs the PyTorch model. The kernels read the
model's own parameter and KV-cache storage: nothing is copied.
"""

from __future__ import annotations

import ctypes

import torch

from genserve.engine.forward_context import ForwardContext
from genserve.kernels import load_kernels
from genserve.layers.packed_linear import PACKED_MAX_ROWS

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


class StackLayer(ctypes.Structure):
    _fields_ = [(name, P) for name in ("qkv", "o", "gate_up", "down", "k_cache", "v_cache")]


class StackScratch(ctypes.Structure):
    _fields_ = [(name, P) for name in ("h", "qkv", "attn", "o", "gu", "act", "down")]


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
        embed = model.model.embed_tokens.weight
        self.lm_head = embed if model.lm_head is None else model.lm_head.weight
        self._stack_args: tuple | None = None

    @staticmethod
    def create(model: torch.nn.Module, dtype: torch.dtype) -> FusedDecode | None:
        cfg = getattr(model, "config", None)
        if dtype != torch.bfloat16 or cfg is None or cfg.head_dim > 256:
            return None
        if getattr(model, "rotary", None) is None or model.rotary.kind == "dynamic":
            return None
        lib = load_kernels()
        return None if lib is None else FusedDecode(model, lib)

    # Past this many rows the step is compute- rather than bandwidth-bound, and matmuls on
    # prepacked weights (`forward_mixed`: AMX tiles, or oneDNN) beat the kernel's AVX512 dot
    # products. SmolLM2-135M, 2 threads, AMX, ms per step fused | mixed: 1 row 13.5 | 18.7,
    # 2 rows 16.3 | 16.6, 3 rows 22.0 | 21.4, 4 rows 25.6 | 19.0, 8 rows 43.9 | 23.2.
    # Where every linear is packed in AMX tiles, the one-call stack (`forward_stack`) beats the
    # fused layer from one row on (same window, fused | stack: 1 row 12.4 | 11.4, 2 rows 16.2 |
    # 12.4): the layer kernel then serves CPUs with AVX512-BF16 and no AMX.
    MAX_ROWS = 2

    def supports(self, ctx: ForwardContext) -> bool:
        """Whether `forward` (the fused layer kernel) takes this step."""
        return not ctx.prefills and 0 < ctx.num_decode <= self.MAX_ROWS and self._stack() is None

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

    def _stack(self) -> tuple | None:
        """(linear kernel, LayerWeights array, StackLayer array) for `forward_stack`, when every
        linear of every layer is packed in AMX tiles; built on first use (the KV caches are in
        place by then)."""
        if self._stack_args is None:
            linears = [
                (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                 layer.mlp.down_proj)
                for layer in self.model.model.layers
            ]  # fmt: skip
            packed = [[m.packed for m in group] for group in linears]
            if not all(p is not None and p.amx is not None for g in packed for p in g):
                self._stack_args = ()
                return None
            stack = [
                StackLayer(*(p.data.data_ptr() for p in g), attn.k_cache.data_ptr(),
                           attn.v_cache.data_ptr())
                for g, (_, attn) in zip(packed, self.layers, strict=True)
            ]  # fmt: skip
            n = len(stack)
            amx = packed[0][0].amx
            fn = ctypes.cast(amx.genserve_amx_linear_bf16, P)
            glu = (
                ctypes.cast(amx.genserve_amx_glu_bf16, P)
                if self.cfg.intermediate_size % 16 == 0
                else None
            )
            self._stack_args = (
                fn,
                glu,
                (LayerWeights * n)(*(w for w, _ in self.layers)),
                (StackLayer * n)(*stack),
            )
        return self._stack_args or None

    def forward_stack(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """A pure-decode step of any number of rows up to `PACKED_MAX_ROWS`, every layer in one
        native call (`genserve_decode_stack_bf16`): `forward_mixed`'s calls without the trips
        back to Python. Needs `_stack()`."""
        fn, glu, weights, layers = self._stack()
        cfg = self.cfg
        t, hid = input_ids.shape[0], cfg.hidden_size
        heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        inter = cfg.intermediate_size
        x = self.model.model.embed_tokens(input_ids).contiguous()
        cos_sin = self.model.rotary.cos_sin_for(positions).contiguous()
        widths = (hid, (heads + 2 * kv_heads) * d, heads * d, hid, 2 * inter, inter, hid)
        buffers = [torch.empty(t, n, dtype=torch.bfloat16) for n in widths]
        scratch = StackScratch(*(b.data_ptr() for b in buffers))
        out = torch.empty_like(x)
        tables = ctx.decode_block_tables.contiguous()
        lens = ctx.decode_context_lens.contiguous()
        slots = ctx.slot_mapping.contiguous()
        attn = self.layers[0][1]
        norm = self.model.model.norm
        rc = self.lib.genserve_decode_stack_bf16(
            fn, glu, weights, layers, ctypes.c_int(len(layers)), P(x.data_ptr()), ctypes.c_int(t),
            P(cos_sin.data_ptr()), P(slots.data_ptr()), P(tables.data_ptr()),
            ctypes.c_int(tables.shape[1]), P(lens.data_ptr()), I64(ctx.decode_max_context),
            ctypes.c_int(attn.k_cache.shape[1]), ctypes.c_float(attn.scale),
            ctypes.byref(scratch), P(norm.weight.data_ptr()), ctypes.c_float(norm.eps),
            P(out.data_ptr()),
        )  # fmt: skip
        if rc:
            raise RuntimeError("native decode step failed (out of memory?)")
        return out

    def forward_mixed(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """Any other step (many decode rows, prefill chunks, both). Each layer's four matmuls
        run on the packed weights (`layers/packed_linear.py`: AMX tiles or oneDNN, up to
        `PACKED_MAX_ROWS` rows; `F.linear` beyond); what lies between them runs in native
        calls: residual add + RMSNorm, q/k norm + rotary + cache write, SiLU * up, and paged
        attention for the decode rows (prefill chunks attend with PyTorch's SDPA,
        `PagedAttention._prefill`). Same rounding as the PyTorch path. Pure-decode steps go
        to `forward_stack` where it can take them."""
        cfg, lib = self.cfg, self.lib
        t, hid = input_ids.shape[0], cfg.hidden_size
        if not ctx.prefills and t <= PACKED_MAX_ROWS and self._stack() is not None:
            return self.forward_stack(input_ids, positions, ctx)
        heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_size, kv_size = heads * d, kv_heads * d
        x = self.model.model.embed_tokens(input_ids).contiguous()
        cos_sin = self.model.rotary.cos_sin_for(positions).contiguous()
        slots = ctx.slot_mapping.contiguous()
        h = torch.empty(t, hid, dtype=torch.bfloat16)
        attn_out = torch.empty(t, q_size, dtype=torch.bfloat16)
        act = torch.empty(t, cfg.intermediate_size, dtype=torch.bfloat16)
        eps = cfg.rms_norm_eps
        delta: torch.Tensor | None = None
        prefill = self._prefill_args(ctx) if ctx.prefills else None
        for layer, (w, attn) in zip(self.model.model.layers, self.layers, strict=True):
            sa, mlp = layer.self_attn, layer.mlp
            lib.genserve_add_rmsnorm_bf16(
                x.data_ptr(), _ptr(delta), w.ln1, h.data_ptr(), t, hid, eps
            )
            qkv = sa.qkv_proj(h)
            lib.genserve_qkv_post_bf16(
                qkv.data_ptr(), t, heads, kv_heads, d, cos_sin.data_ptr(), w.q_norm, w.k_norm, eps,
                attn.k_cache.data_ptr(), attn.v_cache.data_ptr(), slots.data_ptr(),
            )  # fmt: skip
            if ctx.num_decode and attn.decode_native(lib, qkv, qkv.shape[1], attn_out, q_size, ctx):
                raise RuntimeError("native paged attention failed (out of memory?)")
            native_prefill = prefill is not None and not lib.genserve_prefill_attention_amx(
                qkv.data_ptr(), qkv.shape[1], attn_out.data_ptr(), q_size, attn.k_cache.data_ptr(),
                attn.v_cache.data_ptr(), *prefill[1], heads, kv_heads, d, attn.k_cache.shape[1],
                attn.scale,
            )  # fmt: skip
            for p in () if native_prefill else ctx.prefills:
                rows = slice(p.token_start, p.token_start + p.num_tokens)
                q, k, v = qkv[rows].split([q_size, kv_size, kv_size], dim=-1)
                out = attn._prefill(
                    q.view(-1, heads, d), k.view(-1, kv_heads, d), v.view(-1, kv_heads, d),
                    p.context_len, p.block_table,
                )  # fmt: skip
                attn_out[rows] = out.reshape(p.num_tokens, q_size)
            o = sa.o_proj(attn_out)
            lib.genserve_add_rmsnorm_bf16(
                x.data_ptr(), o.data_ptr(), w.ln2, h.data_ptr(), t, hid, eps
            )
            delta = mlp.down_proj(self._glu(mlp.gate_up_proj, h, act))
        out = torch.empty_like(x)
        norm = self.model.model.norm
        lib.genserve_add_rmsnorm_bf16(
            x.data_ptr(), _ptr(delta), norm.weight.data_ptr(), out.data_ptr(), t, hid, norm.eps
        )
        return out

    def _glu(self, gate_up: torch.nn.Module, h: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of the stacked gate_up projection of h: in one pass on its AMX
        packing (`PackedWeight.glu`) where the rows are few enough, else the linear, then
        `genserve_silu_mul_bf16` into `act`. The same bf16 values either way."""
        packed = getattr(gate_up, "packed", None)
        if packed is not None and h.shape[0] <= PACKED_MAX_ROWS:
            out = packed.glu(h)
            if out is not None:
                return out
        gu = gate_up(h)
        self.lib.genserve_silu_mul_bf16(gu.data_ptr(), act.data_ptr(), h.shape[0], act.shape[1])
        return act

    def _prefill_args(self, ctx: ForwardContext) -> tuple | None:
        """The prefill chunks of a step as `genserve_prefill_attention_amx` takes them (built
        with AMX only): (tensors to keep alive, the pointer and count arguments)."""
        if not hasattr(self.lib, "genserve_prefill_attention_amx"):
            return None
        chunks = ctx.prefills
        width = max(p.block_table.numel() for p in chunks)
        tables = torch.zeros(len(chunks), width, dtype=torch.int64)
        for i, p in enumerate(chunks):
            tables[i, : p.block_table.numel()] = p.block_table
        meta = torch.tensor(
            [[p.token_start for p in chunks], [p.num_tokens for p in chunks],
             [p.context_len for p in chunks]],
            dtype=torch.int64,
        )  # fmt: skip
        args = (tables.data_ptr(), width, meta[0].data_ptr(), meta[1].data_ptr(),
                meta[2].data_ptr(), len(chunks))  # fmt: skip
        return (tables, meta), args

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] bf16 -> [N, vocab] float32 (fp32 accumulation, no bf16 rounding)."""
        hidden = hidden.contiguous()
        n, k = hidden.shape
        vocab = self.lm_head.shape[0]
        out = torch.empty(n, vocab, dtype=torch.float32)
        self.lib.genserve_gemm_bf16(
            self.lm_head.data_ptr(), None, hidden.data_ptr(), k, out.data_ptr(), vocab, n, vocab,
            k, 1,
        )  # fmt: skip
        return out

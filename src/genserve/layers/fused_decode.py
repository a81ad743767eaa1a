"""The native whole-step decode paths a Llama-family model declares (`decode_fast_path`).

- `stack`: every layer of a pure-decode step in one native call (`genserve_decode_stack_bf16`)
  where every linear is packed for one kernel family (AMX tiles, or panels on the other sets):
  the calls `LlamaForCausalLM.forward` makes (packed linears and GLU, native small ops and
  decode attention), in the same order, without the trips back to Python between them: the
  same bf16 values, at any row count.
- `layer`: the fused layer kernel (`genserve_decode_layer_bf16`) per layer, for pure-decode
  steps of up to `MAX_ROWS` rows on the plain weights (its dot products are
  `genserve_gemm_bf16`'s, its attention and SwiGLU the standalone kernels'): the path where the
  packed copy did not fit its memory budget.

The kernels read the model's own parameter and KV-cache storage: nothing is copied.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from genserve.engine.forward_context import ForwardContext
from genserve.kernels import decoder
from genserve.models.base import StepFn


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def layer_weights(layer: torch.nn.Module, cfg) -> decoder.LayerWeights:
    """Pointers to one Llama decoder layer's plain parameters."""
    attn, mlp = layer.self_attn, layer.mlp
    return decoder.LayerWeights(
        _ptr(layer.input_layernorm.weight), _ptr(attn.qkv_proj.weight), _ptr(attn.qkv_proj.bias),
        _ptr(attn.o_proj.weight), _ptr(layer.post_attention_layernorm.weight),
        _ptr(mlp.gate_up_proj.weight), _ptr(mlp.down_proj.weight),
        _ptr(attn.q_norm.weight) if attn.qk_norm else None,
        _ptr(attn.k_norm.weight) if attn.qk_norm else None,
        cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
        cfg.intermediate_size, cfg.rms_norm_eps,
    )  # fmt: skip


class FusedDecode:
    """ctypes views of one bf16 Llama model's weights; `step_fn` hands out a path's forward."""

    # Past this many rows the layer kernel's dot products lose to matmuls on whole tiles.
    # SmolLM2-135M, 2 threads, ms per step, layer kernel | model forward: 1 row 13.5 | 18.7,
    # 2 rows 16.3 | 16.6, 3 rows 22.0 | 21.4, 4 rows 25.6 | 19.0, 8 rows 43.9 | 23.2
    MAX_ROWS = 2

    def __init__(self, model: torch.nn.Module, lib: ctypes.CDLL) -> None:
        self.model = model
        self.lib = lib
        self.cfg = model.config
        self.layers = [layer_weights(layer, self.cfg) for layer in model.model.layers]
        self.attn = model.attention_layers()
        self._stack_args: tuple | None = None

    def step_fn(self, path: str, ctx: ForwardContext) -> StepFn | None:
        if ctx.prefills or not ctx.num_decode:
            return None
        if path == "stack" and self._stack() is not None:
            return functools.partial(self.forward_stack, ctx=ctx)
        if path == "layer" and ctx.num_decode <= self.MAX_ROWS:
            return functools.partial(self.forward_layers, ctx=ctx)
        return None

    def _inputs(self, input_ids: torch.Tensor, positions: torch.Tensor):
        x = self.model.model.embed_tokens(input_ids).contiguous()  # [T, hidden]
        return x, self.model.rotary.cos_sin_for(positions).contiguous()  # [T, D] fp32

    def forward_layers(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> final-normed hidden states [T, hidden] bf16."""
        x, cos_sin = self._inputs(input_ids, positions)
        scratch, _keep = decoder.layer_scratch(self.cfg, x.shape[0], ctx.decode_max_context)
        tables = ctx.decode_block_tables.contiguous()
        lens = ctx.decode_context_lens.contiguous()
        for w, attn in zip(self.layers, self.attn, strict=True):
            decoder.decode_layer(
                self.lib, weights=w, x=x, cos_sin=cos_sin, k_cache=attn.k_cache,
                v_cache=attn.v_cache, slot_mapping=ctx.slot_mapping, block_tables=tables,
                context_lens=lens, scratch=scratch,
            )  # fmt: skip
        return self.model.model.norm(x)

    def _stack(self) -> tuple | None:
        """(linear kernel, glu kernel, LayerWeights array, StackLayer array) when every linear
        of every layer is packed for one kernel family (AMX tiles or panels, `Packing`); built
        on first use (the KV caches are bound)."""
        if self._stack_args is None:
            groups = [
                [layer.self_attn.qkv_proj.packed, layer.self_attn.o_proj.packed,
                 layer.mlp.gate_up_proj.packed, layer.mlp.down_proj.packed]
                for layer in self.model.model.layers
            ]  # fmt: skip
            packings = {None if p is None else p.packing for g in groups for p in g}
            if len(packings) != 1 or None in packings:
                self._stack_args = ()
                return None
            (packing,) = packings
            stack = [
                decoder.StackLayer(*(p.data.data_ptr() for p in g), attn.k_cache.data_ptr(),
                                   attn.v_cache.data_ptr())
                for g, attn in zip(groups, self.attn, strict=True)
            ]  # fmt: skip
            n = len(stack)
            glu = packing.fn("glu_bf16") if self.cfg.intermediate_size % 16 == 0 else None
            self._stack_args = (
                ctypes.cast(packing.fn("linear_bf16"), ctypes.c_void_p).value,
                None if glu is None else ctypes.cast(glu, ctypes.c_void_p).value,
                (decoder.LayerWeights * n)(*self.layers),
                (decoder.StackLayer * n)(*stack),
            )
        return self._stack_args or None

    def forward_stack(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """A pure-decode step of any number of rows, every layer in one native call."""
        linear, glu, weights, layers = self._stack()
        x, cos_sin = self._inputs(input_ids, positions)
        out = torch.empty_like(x)
        norm, attn = self.model.model.norm, self.attn[0]
        rc = decoder.decode_stack(
            self.lib, linear=linear, glu=glu, weights=weights, layers=layers, x=x,
            cos_sin=cos_sin, slot_mapping=ctx.slot_mapping,
            block_tables=ctx.decode_block_tables.contiguous(),
            context_lens=ctx.decode_context_lens.contiguous(), max_context=ctx.decode_max_context,
            block_size=attn.k_cache.shape[1], scale=attn.scale, final_norm=norm.weight,
            final_eps=norm.eps, out=out,
        )  # fmt: skip
        if rc:
            raise RuntimeError("native decode step failed (out of memory?)")
        return out

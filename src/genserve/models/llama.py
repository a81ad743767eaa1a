"""The Llama family: Llama 2/3 (Touvron et al., 2023), Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm),
SmolLM. One decoder: RMSNorm, rotary, grouped-query attention, SwiGLU, optional tied embeddings.

The model is textbook and the one definition of the forward for every dtype and CPU:
`forward(input_ids, positions)`; batch layout comes from the forward context read by
`PagedAttention`; each layer runs its kernel set's kernels (`bind_kernels`). It declares the
native whole-step decode paths of `layers/fused_decode.py` (`decode_fast_path`).
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from genserve.config import ModelConfig
from genserve.engine.forward_context import ForwardContext, get_forward_context
from genserve.kernels.gemm import gemm_bf16
from genserve.layers.attention import PagedAttention
from genserve.layers.basic import RMSNorm, RotaryEmbedding
from genserve.layers.fused_decode import FusedDecode
from genserve.layers.kernels import bind_layer_kernels
from genserve.layers.packed_linear import Linear, PackedWeight
from genserve.models.base import StepFn


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias
        )
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        q_norm, k_norm = (self.q_norm, self.k_norm) if self.qk_norm else (None, None)
        return self.o_proj(self.attn(self.qkv_proj(x), cos_sin, q_norm, k_norm))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.glu(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, cos_sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's output (the embeddings where residual is None), residual:
        the stream before it -> (this layer's output, the stream before it), [T, hidden]."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, cos_sin), residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    # checkpoint name -> (our parameter name, shard) for weights we pack together
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        with torch.device("cpu"):  # a real table even when the model is built on `meta`
            self.rotary = RotaryEmbedding(
                cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
            )
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def shard_slice(self, param_name: str, shard: str | int) -> slice:
        """Rows of a packed parameter that hold one checkpoint tensor."""
        cfg = self.config
        if param_name.endswith("qkv_proj.weight") or param_name.endswith("qkv_proj.bias"):
            q = cfg.num_attention_heads * cfg.head_dim
            kv = cfg.num_key_value_heads * cfg.head_dim
            start = {"q": 0, "k": q, "v": q + kv}[str(shard)]
            return slice(start, start + (q if shard == "q" else kv))
        i = cfg.intermediate_size
        return slice(int(shard) * i, (int(shard) + 1) * i)

    def _cos_sin(self, positions: torch.Tensor) -> torch.Tensor:
        if self.rotary.kind != "dynamic":
            return self.rotary.cos_sin_for(positions)
        # dynamic NTK: each sequence's rows use the table for its own length (as transformers)
        ctx = get_forward_context()
        parts, row = [], 0
        lengths = [1] * ctx.num_decode + [p.num_tokens for p in ctx.prefills]
        for n, end in zip(lengths, ctx.seq_ends, strict=True):
            parts.append(self.rotary.cos_sin_for(positions[row : row + n], end))
            row += n
        return torch.cat(parts)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden]."""
        cos_sin = self._cos_sin(positions)
        x, residual = self.model.embed_tokens(input_ids), None
        for layer in self.model.layers:
            x, residual = layer(x, residual, cos_sin)
        return self.model.norm(x, residual)[0]

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    # prepacked output projection (fp32 logits), set by packed_linear.pack_linear_weights
    packed_lm_head: PackedWeight | None = None
    _lib: ctypes.CDLL | None = None
    _fused: FusedDecode | None = None

    def bind_kernels(self, kernel_set: str, pack_budget: int = 0) -> int:
        """Every layer takes `kernel_set`'s kernels; returns the bytes of weights packed."""
        self._lib, packed = bind_layer_kernels(self, kernel_set, pack_budget)
        bf16 = self.model.embed_tokens.weight.dtype == torch.bfloat16
        fast = bf16 and self._lib is not None and self.config.head_dim <= 256
        self._fused = (
            FusedDecode(self, self._lib) if fast and self.rotary.kind != "dynamic" else None
        )
        return packed

    def decode_fast_path(self, path: str, ctx: ForwardContext) -> StepFn | None:
        """`stack` or `layer` (`layers/fused_decode.py`) for a pure-decode step, where bound."""
        return None if self._fused is None else self._fused.step_fn(path, ctx)

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32, by the same kernel at any N."""
        if self.packed_lm_head is not None:
            return self.packed_lm_head(hidden, out_f32=True)
        if self._lib is not None and hidden.dtype == torch.bfloat16:
            return gemm_bf16(self._lib, hidden, self.lm_head_weight(), out_f32=True)
        return torch.nn.functional.linear(hidden, self.lm_head_weight()).float()

    def greedy(
        self, hidden: torch.Tensor, vocab: int, logprobs: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Each row's argmax over the first `vocab` logits (and its log_softmax), straight from
        the AMX-packed output projection: no [N, vocab] logits; None where it has none."""
        head = self.packed_lm_head
        return None if head is None else head.argmax(hidden, vocab, logprobs)


# architecture quirks (Mistral, Qwen2 qkv bias, Qwen3 q/k norm) are ModelConfig fields that the
# layers above read; the registry (`models/registry.py`) maps each HF name to this class

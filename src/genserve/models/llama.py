"""The Llama family: Llama 2/3 (Touvron et al., 2023), Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm),
SmolLM. One decoder: RMSNorm, rotary, grouped-query attention, SwiGLU, optional tied embeddings.

The model is textbook: `forward(input_ids, positions)`; batch layout comes from the forward
context read by `PagedAttention`.
"""

from __future__ import annotations

import torch
from torch import nn

from genserve.config import ModelConfig
from genserve.engine.forward_context import get_forward_context
from genserve.layers.attention import PagedAttention
from genserve.layers.basic import RMSNorm, RotaryEmbedding, silu_and_mul
from genserve.layers.packed_linear import PACKED_MAX_ROWS, Linear, PackedWeight


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
        # x: [T, hidden]
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = RotaryEmbedding.apply(q, cos_sin)
        k = RotaryEmbedding.apply(k, cos_sin)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin)
        return x + self.mlp(self.post_attention_layernorm(x))


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
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos_sin)
        return self.model.norm(x)

    # prepacked output projection (fp32 logits), set by packed_linear.pack_linear_weights
    packed_lm_head: PackedWeight | None = None

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def packed_head(self, rows: int) -> PackedWeight | None:
        """The packed output projection where it serves `rows` rows, else None."""
        return self.packed_lm_head if rows <= PACKED_MAX_ROWS else None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32."""
        head = self.packed_head(hidden.shape[0])
        if head is not None:
            return head(hidden, out_f32=True)
        return torch.nn.functional.linear(hidden, self.lm_head_weight()).float()


# HF architecture name -> model class. Mistral, Qwen2, Qwen3 and SmolLM share the Llama decoder.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}

"""The architecture registry: Hugging Face `architectures[0]` name -> the model class that
implements it (the contract in `models/base.py`). The loader resolves every checkpoint here."""

from __future__ import annotations

from genserve.models.base import CausalLM
from genserve.models.llama import LlamaForCausalLM

# Mistral, Qwen2 (qkv bias) and Qwen3 (q/k norm) are configurations of the Llama decoder
ARCHITECTURES: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def model_class(architecture: str) -> type[CausalLM] | None:
    """The class for `architecture`, or None where genserve does not implement it."""
    return ARCHITECTURES.get(architecture)

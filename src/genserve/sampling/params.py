"""Per-request sampling and stopping parameters (already validated; engine-side, no pydantic)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from genserve.sampling.grammar import CompiledGrammar


@dataclass(slots=True)
class SamplingParams:
    """What the sampler does with one row of logits.

    Defaults are the identity: greedy argmax with no processor at all.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = disabled
    top_p: float = 1.0
    typical_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # TGI/CTRL style, over prompt + generated ids
    frequency_penalty: float = 0.0  # TGI style: count / sequence length (TGI) ...
    presence_penalty: float = 0.0  # OpenAI style: flat, once per seen generated token
    openai_penalties: bool = (
        False  # frequency penalty with OpenAI semantics (raw count, generated ids only)
    )
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    watermark: bool = False
    top_n_tokens: int = 0
    logprobs: bool = True  # compute the chosen token's logprob
    grammar: CompiledGrammar | None = None  # constrained decoding (shared, immutable handle)

    @property
    def uses_warpers(self) -> bool:
        return (
            self.temperature != 1.0
            or self.top_k != 0
            or self.top_p < 1.0
            or self.typical_p < 1.0
            or self.min_p > 0.0
        )

    @property
    def sampling(self) -> bool:
        """TGI forces sampling whenever a warper is active."""
        return self.do_sample or self.uses_warpers


@dataclass(slots=True)
class StoppingParams:
    max_new_tokens: int = 16
    stop_sequences: list[str] = field(default_factory=list)
    ignore_eos: bool = False

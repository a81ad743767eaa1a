"""The contract every model implements: what the loader, the model runner and the engine may
rely on, and nothing else (they never walk a model's submodules).

A model is the one definition of its forward for every dtype and CPU: its layers pick their
kernels (`layers/`), bound once through `bind_kernels`. A whole-step native fast path is
something the model declares (`decode_fast_path`), never something the runner discovers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from genserve.config import ModelConfig
    from genserve.engine.forward_context import ForwardContext
    from genserve.layers.attention import PagedAttention

# (input_ids [T], positions [T]) -> final-normed hidden states [T, hidden]
StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@runtime_checkable
class CausalLM(Protocol):
    config: ModelConfig
    # checkpoint tensor name part -> (our parameter name part, shard) for weights stored packed
    packed_modules: dict[str, tuple[str, str | int]]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] -> final-normed hidden states [T, hidden]; the batch
        layout (decode rows, prefill chunks, slots) comes from the forward context."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32."""
        ...

    def attention_layers(self) -> list[PagedAttention]:
        """One per decoder layer, in order: the runner binds each its K/V cache."""
        ...

    def shard_slice(self, param_name: str, shard: str | int) -> slice:
        """Rows of a packed parameter that hold one checkpoint tensor."""
        ...

    def bind_kernels(self, kernel_set: str, pack_budget: int = 0) -> int:
        """Every layer takes this set's kernels (`kernels/cpu.py`: amx, avx512-bf16, avx2-fma,
        torch), packing weights within `pack_budget` bytes where the set reads packed ones;
        returns the bytes packed."""
        ...

    def decode_fast_path(self, path: str, ctx: ForwardContext) -> StepFn | None:
        """A native whole-step forward for this step where the model offers `path` (the
        runner's table names it), else None: the step then runs `forward`. Each must give the
        bf16 values `forward` gives."""
        ...

    def greedy(
        self, hidden: torch.Tensor, vocab: int, logprobs: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Optional shortcut: [N] argmax over the first `vocab` logits of hidden [N, hidden]
        (as `argmax_rows` picks), with their log_softmax where asked, else None; None where
        the model has no cheaper way than `compute_logits`."""
        ...

"""Watermarking logits: Kirchenbauer et al., "A Watermark for Large Language Models" (2023).

Before each token, the previous token seeds a generator that draws a random "greenlist" holding
`gamma` of the vocabulary; `delta` is added to the greenlist's logits. A detector that knows the
hash key re-derives the greenlists and counts how many generated tokens fell in them.

TGI's parameters and seeding (`server/text_generation_server/utils/watermark.py`): the seed is
`hash_key * previous_token` with hash key 15485863, the greenlist is the first
`int(vocab * gamma)` entries of `randperm(vocab)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from genserve.engine.request import Request


@dataclass(frozen=True, slots=True)
class WatermarkConfig:
    gamma: float = 0.5  # fraction of the vocabulary in the greenlist
    delta: float = 2.0  # logit bias added to greenlist tokens
    hash_key: int = 15485863  # multiplies the previous token id to seed the greenlist


def greenlist_ids(prev_token: int, vocab_size: int, config: WatermarkConfig) -> torch.Tensor:
    """The greenlist that follows `prev_token`: [int(vocab_size * gamma)] int64 ids, on CPU.

    Always drawn from a CPU generator (TGI uses the logits' device) so that a detector on any
    device re-derives the same lists; the permutation of a CUDA generator differs from a CPU one.
    """
    rng = torch.Generator(device="cpu")
    rng.manual_seed(config.hash_key * prev_token)
    size = int(vocab_size * config.gamma)
    return torch.randperm(vocab_size, generator=rng)[:size]


class WatermarkProcessor:
    """Adds `delta` to each watermarked row's greenlist logits (rows listed in `rows`).

    One `randperm(V)` per watermarked row per step: the greenlist depends on the previous token,
    so it cannot be precomputed per request. Rows without a watermark are untouched.
    """

    def __init__(self, rows: Sequence[int], config: WatermarkConfig) -> None:
        self.rows = list(rows)
        self.config = config

    @classmethod
    def build(
        cls, requests: Sequence[Request], config: WatermarkConfig
    ) -> WatermarkProcessor | None:
        rows = [i for i, r in enumerate(requests) if r.sampling.watermark]
        return cls(rows, config) if rows else None

    def __call__(self, scores: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        # scores: [B, V], modified in place
        vocab = scores.shape[1]
        cols = torch.stack(
            [greenlist_ids(requests[r].all_token_ids[-1], vocab, self.config) for r in self.rows]
        ).to(scores.device)  # [R, int(V * gamma)]
        rows = torch.tensor(self.rows, device=scores.device).unsqueeze(1).expand_as(cols)
        bias = torch.full(cols.shape, self.config.delta, dtype=scores.dtype, device=scores.device)
        return scores.index_put_((rows, cols), bias, accumulate=True)

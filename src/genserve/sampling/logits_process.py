"""Batched logits processors, in TGI's order (`server/text_generation_server/utils/tokens.py`).

    watermark -> repetition penalty -> frequency penalty (TGI) -> OpenAI frequency/presence
    -> logit_bias -> grammar mask -> temperature -> top_k -> top_p -> typical_p -> min_p

Every processor is built for a batch only when at least one row needs it, and works on the
whole `[B, V]` float32 tensor with per-row parameters as `[B, 1]` tensors; rows that do not need
it get identity values (penalty 1, temperature 1, top_p 1, ...). Parameters are read from the
requests once per batch composition (`LogitsPipeline.build`); only the token counts are rebuilt
each step, from the requests' id lists, with one `bincount`.

Two deliberate differences from TGI, both fixing its padding artefacts: token counts do not count
the pad id 0 of shorter rows, and the TGI frequency penalty divides by each row's own length, not
the padded batch length.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from genserve.engine.request import Request
from genserve.kernels import load_kernels
from genserve.sampling.grammar_mask import GrammarMask, GrammarStates
from genserve.sampling.params import SamplingParams
from genserve.sampling.watermark import WatermarkConfig, WatermarkProcessor

FILTER_VALUE = float("-inf")


def _column(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """Per-row parameters as a [B, 1] float32 tensor (Python doubles rounded once, as a scalar is
    when transformers compares or divides a float32 tensor by it)."""
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def count_tokens(
    id_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """Occurrences of each id per row: [B, V] float32, one bincount over `row * V + id`.

    Ids outside [0, V) (logits narrower than the tokenizer) are not counted.
    """
    lengths = torch.tensor([len(ids) for ids in id_lists], device=device)
    flat = torch.tensor(list(itertools.chain.from_iterable(id_lists)), dtype=torch.long)
    flat = flat.to(device)
    rows = torch.repeat_interleave(torch.arange(len(id_lists), device=device), lengths)
    valid = (flat >= 0) & (flat < vocab_size)
    index = rows[valid] * vocab_size + flat[valid]
    counts = torch.bincount(index, minlength=len(id_lists) * vocab_size)
    return counts.view(len(id_lists), vocab_size).to(torch.float32)


class TokenHistory:
    """One step's view of the batch's token ids, with counts built lazily and at most once.

    `all_rows` / `generated_rows` say which rows need counts over prompt + generated ids and over
    generated ids only; other rows count nothing, which is the identity for every penalty.
    """

    def __init__(
        self,
        requests: Sequence[Request],
        vocab_size: int,
        device: torch.device,
        all_rows: frozenset[int] = frozenset(),
        generated_rows: frozenset[int] = frozenset(),
    ) -> None:
        self.requests = requests
        self.vocab_size = vocab_size
        self.device = device
        self._all_rows = all_rows
        self._generated_rows = generated_rows
        self._all: torch.Tensor | None = None
        self._generated: torch.Tensor | None = None

    def all_counts(self) -> torch.Tensor:
        """[B, V] counts over prompt + generated ids."""
        if self._all is None:
            rows = self._all_rows
            lists = [r.all_token_ids if i in rows else () for i, r in enumerate(self.requests)]
            self._all = count_tokens(lists, self.vocab_size, self.device)
        return self._all

    def generated_counts(self) -> torch.Tensor:
        """[B, V] counts over generated ids only."""
        if self._generated is None:
            rows = self._generated_rows
            lists = [r.output_token_ids if i in rows else () for i, r in enumerate(self.requests)]
            self._generated = count_tokens(lists, self.vocab_size, self.device)
        return self._generated

    def lengths(self) -> torch.Tensor:
        """[B, 1] float32 number of prompt + generated ids (at least 1)."""
        return _column([max(r.num_tokens, 1) for r in self.requests], self.device)


# --------------------------------------------------------------------------- penalties


class RepetitionPenalty:
    """CTRL (Keskar et al. 2019): a seen token's logit s becomes s/p if s > 0, s*p if s < 0."""

    def __init__(self, penalty: torch.Tensor) -> None:
        self.penalty = penalty  # [B, 1]

    def __call__(self, scores: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        seen = history.all_counts() > 0
        penalized = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen, penalized, scores)


class FrequencyPenalty:
    """TGI's: `scores -= p * count(token) / len(ids)` over prompt + generated ids."""

    def __init__(self, penalty: torch.Tensor) -> None:
        self.penalty = penalty  # [B, 1]

    def __call__(self, scores: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        freq = history.all_counts() / history.lengths()
        return scores.sub_(freq * self.penalty)


class OpenAIPenalties:
    """OpenAI's: `scores -= frequency * count + presence * (count > 0)`, generated ids only."""

    def __init__(self, frequency: torch.Tensor, presence: torch.Tensor) -> None:
        self.frequency = frequency  # [B, 1]
        self.presence = presence  # [B, 1]

    def __call__(self, scores: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        counts = history.generated_counts()
        scores.sub_(counts * self.frequency)
        return scores.sub_((counts > 0).to(scores.dtype) * self.presence)


class LogitBias:
    """Adds each row's `{token_id: bias}`; ids outside the logits are left out (validation's job)."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> None:
        self.rows, self.cols, self.values = rows, cols, values  # [N] each

    def __call__(self, scores: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        return scores.index_put_((self.rows, self.cols), self.values, accumulate=True)


# --------------------------------------------------------------------------- warpers


class Temperature:
    def __init__(self, temperature: torch.Tensor) -> None:
        self.temperature = temperature  # [B, 1]

    def __call__(self, scores: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        return scores.div_(self.temperature)


class TopK:
    """Keeps the k highest logits per row (ties with the k-th kept); k = 0 disables a row.

    On CPU the native kernel finds each row's k-th value without sorting or topk
    (`genserve_top_k_mask_f32`; 32 rows of 49,152 logits: ~1-2 ms against ~9-16 ms)."""

    def __init__(self, top_k: Sequence[int], device: torch.device) -> None:
        self.max_k = max(top_k)
        self.kth_index = torch.tensor([max(k, 1) - 1 for k in top_k], device=device).unsqueeze(1)
        self.disabled = torch.tensor([k == 0 for k in top_k], device=device).unsqueeze(1)
        self.k_i64 = torch.tensor(list(top_k), dtype=torch.int64)  # the native kernel's

    def __call__(self, scores: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        lib = load_kernels() if scores.device.type == "cpu" else None
        if lib is not None and scores.dtype == torch.float32 and scores.stride(1) == 1:
            if not lib.genserve_top_k_mask_f32(
                scores.data_ptr(), scores.stride(0), scores.shape[0], scores.shape[1],
                self.k_i64.data_ptr(),
            ):  # fmt: skip
                return scores
        max_k = min(self.max_k, scores.shape[1])
        top = torch.topk(scores, max_k, dim=1).values  # [B, max_k]
        kth = top.gather(1, self.kth_index.clamp(max=max_k - 1))
        kth.masked_fill_(self.disabled, FILTER_VALUE)
        return scores.masked_fill_(scores < kth, FILTER_VALUE)


class TopP:
    """Nucleus (Holtzman et al. 2019): keeps the smallest set whose probability reaches top_p.

    A token goes when the probability of the tokens ranked above it already reaches top_p (as
    transformers' warper: its ascending cumulative probability is <= 1 - top_p; the sums here
    are in double, so a token within float32 rounding of the cut may differ). On CPU the
    native kernel finds the cut without sorting the row (`genserve_top_p_mask_f32`: buckets of
    probabilities, only the bucket holding the cut sorted). Elsewhere the `CANDIDATES` most
    likely tokens are taken with topk (the nucleus of a language model is usually tens of
    tokens), and only a row whose nucleus is wider is sorted whole (32 rows of 49,152 logits on
    2 cores: sorting ~80 ms, topk of 256 ~5 ms)."""

    CANDIDATES = 256

    def __init__(self, top_p: Sequence[float], device: torch.device) -> None:
        self.top_p = _column(list(top_p), device)  # [B, 1]
        self.top_p_f32 = torch.tensor(list(top_p), dtype=torch.float32)  # the native kernel's
        self.threshold = _column([1.0 - p for p in top_p], device)  # [B, 1]
        # top_p 1 keeps every token (whatever the cumulative sum's rounding says)
        self.disabled = torch.tensor([p >= 1.0 for p in top_p], device=device).unsqueeze(1)

    def __call__(self, scores: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        probs = scores.softmax(dim=1)
        lib = load_kernels() if scores.device.type == "cpu" else None
        if lib is not None and scores.dtype == torch.float32 and scores.stride(1) == 1:
            if not lib.genserve_top_p_mask_f32(
                scores.data_ptr(), scores.stride(0), probs.data_ptr(), scores.shape[0],
                scores.shape[1], self.top_p_f32.data_ptr(),
            ):  # fmt: skip
                return scores
        k = min(self.CANDIDATES, scores.shape[1])
        top, top_idx = probs.topk(k, dim=1)  # descending
        above = top.cumsum(dim=1) - top  # probability ranked above each candidate
        remove_top = (above >= self.top_p) & ~self.disabled
        remove_top[:, 0] = False  # always keep the most likely token
        # the nucleus ends within the candidates where some candidate goes
        inside = remove_top.any(dim=1, keepdim=True) | self.disabled | (k == scores.shape[1])
        remove = torch.ones_like(scores, dtype=torch.bool).scatter_(1, top_idx, remove_top)
        remove &= ~self.disabled
        if not bool(inside.all()):
            wide = (~inside).squeeze(1).nonzero().squeeze(1)
            remove[wide] = self._sorted_mask(scores[wide], self.threshold[wide])
        return scores.masked_fill_(remove, FILTER_VALUE)

    @staticmethod
    def _sorted_mask(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        sorted_logits, sorted_idx = torch.sort(scores, dim=1, descending=False)
        cumulative = sorted_logits.softmax(dim=1).cumsum(dim=1)
        remove = cumulative <= threshold
        remove[:, -1] = False  # always keep the most likely token
        return remove.scatter(1, sorted_idx, remove)


class TypicalP:
    """Locally typical sampling (Meister et al. 2022); mass 1.0 disables a row."""

    def __init__(self, mass: Sequence[float], device: torch.device) -> None:
        self.mass = _column(mass, device)  # [B, 1]
        self.disabled = torch.tensor([m >= 1.0 for m in mass], device=device)

    def __call__(self, scores: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        logp = torch.log_softmax(scores, dim=1)
        entropy = -(logp * logp.exp()).nansum(1, keepdim=True)
        shifted = (-logp - entropy).abs()
        sorted_shifted, sorted_idx = torch.sort(shifted, dim=1, descending=False)
        cumulative = scores.gather(1, sorted_idx).softmax(dim=1).cumsum(dim=1)
        last = (cumulative < self.mass).sum(dim=1)
        last.masked_fill_(self.disabled, scores.shape[1] - 1).clamp_(max=scores.shape[1] - 1)
        remove = sorted_shifted > sorted_shifted.gather(1, last.unsqueeze(1))
        return scores.masked_fill_(remove.scatter(1, sorted_idx, remove), FILTER_VALUE)


class MinP:
    """Drops tokens whose probability is below `min_p * max_prob` (Nguyen et al. 2024)."""

    def __init__(self, min_p: Sequence[float], device: torch.device) -> None:
        self.min_p = _column(min_p, device)  # [B, 1]

    def __call__(self, scores: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        probs = scores.softmax(dim=1)
        threshold = probs.amax(dim=1, keepdim=True) * self.min_p
        return scores.masked_fill_(probs < threshold, FILTER_VALUE)


# --------------------------------------------------------------------------- pipeline

Processor = Callable[[torch.Tensor, TokenHistory], torch.Tensor]


def _penalties(params: Sequence[SamplingParams], device: torch.device) -> list[Processor]:
    out: list[Processor] = []
    if any(p.repetition_penalty != 1.0 for p in params):
        out.append(RepetitionPenalty(_column([p.repetition_penalty for p in params], device)))
    tgi_freq = [0.0 if p.openai_penalties else p.frequency_penalty for p in params]
    if any(tgi_freq):
        out.append(FrequencyPenalty(_column(tgi_freq, device)))
    oai_freq = [p.frequency_penalty if p.openai_penalties else 0.0 for p in params]
    presence = [p.presence_penalty for p in params]
    if any(oai_freq) or any(presence):
        out.append(OpenAIPenalties(_column(oai_freq, device), _column(presence, device)))
    return out


def _logit_bias(
    params: Sequence[SamplingParams], vocab_size: int, device: torch.device
) -> LogitBias | None:
    entries = [
        (row, tok, bias)
        for row, p in enumerate(params)
        for tok, bias in p.logit_bias.items()
        if 0 <= tok < vocab_size
    ]
    if not entries:
        return None
    rows, cols, values = zip(*entries, strict=True)
    return LogitBias(
        torch.tensor(rows, device=device),
        torch.tensor(cols, device=device),
        torch.tensor(values, dtype=torch.float32, device=device),
    )


def _warpers(params: Sequence[SamplingParams], device: torch.device) -> list[Processor]:
    out: list[Processor] = []
    if any(p.temperature != 1.0 for p in params):
        out.append(Temperature(_column([p.temperature for p in params], device)))
    if any(p.top_k != 0 for p in params):
        out.append(TopK([p.top_k for p in params], device))
    if any(p.top_p < 1.0 for p in params):
        out.append(TopP([min(p.top_p, 1.0) for p in params], device))
    if any(p.typical_p < 1.0 for p in params):
        out.append(TypicalP([min(p.typical_p, 1.0) for p in params], device))
    if any(p.min_p > 0.0 for p in params):
        out.append(MinP([p.min_p for p in params], device))
    return out


class LogitsPipeline:
    """All processors one batch needs, in order. `build` returns None when no row needs any."""

    def __init__(
        self,
        processors: list[Processor],
        watermark: WatermarkProcessor | None,
        all_rows: frozenset[int],
        generated_rows: frozenset[int],
    ) -> None:
        self.processors = processors
        self.watermark = watermark
        self.all_rows = all_rows
        self.generated_rows = generated_rows

    @classmethod
    def build(
        cls,
        requests: Sequence[Request],
        vocab_size: int,
        device: torch.device,
        watermark: WatermarkConfig | None = None,
        grammars: GrammarStates | None = None,
    ) -> LogitsPipeline | None:
        """`grammars`: the Sampler's per-request matchers (rows with a grammar get masked)."""
        params = [r.sampling for r in requests]
        processors = _penalties(params, device)
        bias = _logit_bias(params, vocab_size, device)
        processors += [bias] if bias is not None else []
        mask = GrammarMask.build(requests, grammars, device) if grammars is not None else None
        processors += [mask] if mask is not None else []
        processors += _warpers(params, device)
        marker = WatermarkProcessor.build(requests, watermark or WatermarkConfig())
        if not processors and marker is None:
            return None
        all_rows = frozenset(
            i
            for i, p in enumerate(params)
            if p.repetition_penalty != 1.0 or (p.frequency_penalty and not p.openai_penalties)
        )
        generated_rows = frozenset(
            i
            for i, p in enumerate(params)
            if p.presence_penalty or (p.frequency_penalty and p.openai_penalties)
        )
        return cls(processors, marker, all_rows, generated_rows)

    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """logits: [B, V] float32 (left untouched) -> processed scores [B, V] float32."""
        scores = logits.clone()
        if self.watermark is not None:
            scores = self.watermark(scores, requests)
        history = TokenHistory(
            requests, scores.shape[1], scores.device, self.all_rows, self.generated_rows
        )
        for processor in self.processors:
            scores = processor(scores, history)
        return scores

"""Token choice for one step: logits processors, greedy or seeded sampling, logprobs, top tokens.

The all-greedy batch with no processor does one argmax (plus, when asked, the chosen tokens'
logprobs from one logsumexp). Sampling draws one uniform number per row from the request's own
stream (SplitMix64 of its seed and its draw count), so a seed gives the same tokens whatever else
shares the batch, and picks the token by inverse CDF over the row's probabilities in one native
pass (`sample_rows`): per-element noise (`probs / Exponential(1)`) drawn from a `torch.Generator`
per row cost ~1.5 ms per row of 49,152 tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from genserve.engine.request import Request
from genserve.kernels import load_kernels
from genserve.sampling.grammar_mask import GrammarStates
from genserve.sampling.logits_process import LogitsPipeline
from genserve.sampling.watermark import WatermarkConfig


def argmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """`scores.argmax(dim=1)`; on CPU float32 through the native kernel (a vectorised scan over
    rows in parallel: 32 x 49152 logits in ~0.2 ms instead of PyTorch's 1.4 ms)."""
    lib = load_kernels() if scores.device.type == "cpu" else None
    if lib is None or scores.dtype != torch.float32 or scores.dim() != 2 or scores.shape[1] == 0:
        return scores.argmax(dim=1)
    scores = scores.contiguous()
    out = torch.empty(scores.shape[0], dtype=torch.long)
    lib.genserve_argmax_f32(scores.data_ptr(), scores.shape[0], scores.shape[1], out.data_ptr())
    return out


def logsumexp_rows(scores: torch.Tensor) -> torch.Tensor:
    """`scores.logsumexp(dim=1, keepdim=True)`; on CPU float32 through the native kernel
    (32 x 49,152 with masked tokens: ~0.3 ms instead of PyTorch's ~3.5 ms)."""
    lib = load_kernels() if scores.device.type == "cpu" else None
    if lib is None or scores.dtype != torch.float32 or scores.dim() != 2 or scores.stride(1) != 1:
        return scores.logsumexp(dim=1, keepdim=True)
    out = torch.empty(scores.shape[0], 1, dtype=torch.float32)
    lib.genserve_logsumexp_f32(
        scores.data_ptr(), scores.stride(0), scores.shape[0], scores.shape[1], out.data_ptr()
    )
    return out


def chosen_logprobs(scores: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log_softmax(scores) at each row's token: [B] float32."""
    return (scores.gather(1, token_ids.unsqueeze(1)) - logsumexp_rows(scores)).squeeze(1)


def sample_rows(probs: torch.Tensor, u: Sequence[float]) -> torch.Tensor:
    """For each row i of probs [R, V] (rows summing to 1, or any nonnegative weights), the token
    that u[i] in [0, 1) picks by inverse CDF: the first index whose running sum passes
    u[i] * the row's sum. Tokens of probability 0 are never picked. Native on CPU float32."""
    lib = load_kernels() if probs.device.type == "cpu" else None
    rows, n = probs.shape
    if lib is not None and probs.dtype == torch.float32:
        probs = probs.contiguous()
        us = torch.tensor(u, dtype=torch.float64)
        out = torch.empty(rows, dtype=torch.long)
        lib.genserve_sample_cdf_f32(probs.data_ptr(), n, rows, n, us.data_ptr(), out.data_ptr())
        return out
    cdf = probs.double().cumsum(dim=1)
    target = torch.tensor(u, dtype=torch.float64, device=probs.device).unsqueeze(1) * cdf[:, -1:]
    picked = torch.searchsorted(cdf, target, right=True).squeeze(1)
    # rounding past the last running sum: the last token of nonzero probability
    last = n - 1 - (probs > 0).flip(1).int().argmax(dim=1)
    return torch.where(picked >= n, last, picked)


_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@dataclass(slots=True)
class SamplerOutput:
    """One entry per row of the batch, in the order of `requests`."""

    token_ids: list[int]
    # log_softmax of the processed/warped scores at the chosen token; None where the row's
    # `sampling.logprobs` is off and it asked for no top tokens.
    logprobs: list[float | None]
    # (token_id, logprob) best first: the row's `top_n_tokens` best plus ties with the n-th
    # (TGI's `batch_top_tokens`); [] for rows that asked for none.
    top_tokens: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass(slots=True)
class _BatchPlan:
    """What depends only on the batch's composition, built once per composition."""

    pipeline: LogitsPipeline | None
    sample_rows: list[int]  # rows that sample (do_sample or a warper)
    sample_index: torch.Tensor | None  # those rows as a tensor, None when all or none sample
    want_logprobs: list[bool]
    top_n: list[int]


class Sampler:
    """Chooses the next token of each row. Keeps per-request random streams across steps.

    `vocab_size` is the model's: logits columns past it (padded embeddings) are dropped.
    Call `release(request_id)` when a request finishes or is aborted. `grammars` holds the
    constrained requests' matchers; the engine asks `grammars.done(request)` after each token.
    """

    def __init__(self, vocab_size: int, watermark: WatermarkConfig | None = None) -> None:
        self.vocab_size = vocab_size
        self.watermark = watermark or WatermarkConfig()
        self._streams: dict[str, list[int]] = {}  # request id -> [key, draws so far]
        self.grammars = GrammarStates()
        self._plan_key: tuple | None = None
        self._plan: _BatchPlan | None = None

    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> SamplerOutput:
        """logits: [B, >=vocab_size] float32, row i belongs to `requests[i]`."""
        assert logits.dim() == 2 and logits.shape[0] == len(requests), logits.shape
        logits = logits[:, : self.vocab_size].float()
        plan = self._plan_for(requests, logits.device)
        scores = logits if plan.pipeline is None else plan.pipeline(logits, requests)
        token_ids = self._choose(scores, requests, plan)  # [B] int64
        logprobs, top_tokens = _logprobs(scores, token_ids, plan)
        return SamplerOutput(token_ids.tolist(), logprobs, top_tokens)

    def greedy_only(self, requests: Sequence[Request]) -> bool:
        """True when every row takes the argmax of its raw logits and wants no top tokens:
        the model runner may then choose the tokens itself, with their logprobs where a row
        wants them (`wants_logprobs`), and `greedy_output` makes this step's output."""
        plan = self._plan_for(requests, torch.device("cpu"))
        return plan.pipeline is None and not plan.sample_rows and not any(plan.top_n)

    def wants_logprobs(self, requests: Sequence[Request]) -> bool:
        return any(self._plan_for(requests, torch.device("cpu")).want_logprobs)

    def greedy_output(
        self, requests: Sequence[Request], token_ids: torch.Tensor, logprobs: torch.Tensor | None
    ) -> SamplerOutput:
        """The output for the tokens (and log_softmax values, or None) a runner chose under
        `greedy_only`: a logprob for each row that wants one."""
        want = self._plan_for(requests, torch.device("cpu")).want_logprobs
        n = token_ids.shape[0]
        lps = [None] * n if logprobs is None else logprobs.tolist()
        return SamplerOutput(
            token_ids.tolist(),
            [lp if w else None for lp, w in zip(lps, want, strict=True)],
            [[] for _ in range(n)],
        )

    def release(self, request_id: str) -> None:
        """Forget a finished request's random stream and grammar matcher."""
        self._streams.pop(request_id, None)
        self.grammars.release(request_id)
        self._plan_key = None  # a later request may reuse the id: never reuse its plan

    # ------------------------------------------------------------------ internals

    def _plan_for(self, requests: Sequence[Request], device: torch.device) -> _BatchPlan:
        key = (device, *(r.request_id for r in requests))
        if key != self._plan_key or self._plan is None:
            params = [r.sampling for r in requests]
            sample_rows = [i for i, p in enumerate(params) if p.sampling]
            partial = 0 < len(sample_rows) < len(params)
            self._plan = _BatchPlan(
                pipeline=LogitsPipeline.build(
                    requests, self.vocab_size, device, self.watermark, self.grammars
                ),
                sample_rows=sample_rows,
                sample_index=torch.tensor(sample_rows, device=device) if partial else None,
                want_logprobs=[p.logprobs or p.top_n_tokens > 0 for p in params],
                top_n=[max(p.top_n_tokens, 0) for p in params],
            )
            self._plan_key = key
        return self._plan

    def _choose(
        self, scores: torch.Tensor, requests: Sequence[Request], plan: _BatchPlan
    ) -> torch.Tensor:
        if not plan.sample_rows:
            return argmax_rows(scores)
        rows = plan.sample_rows
        sub = scores if plan.sample_index is None else scores.index_select(0, plan.sample_index)
        probs = sub.softmax(dim=1)  # [S, V]
        # one draw per request from its own stream: batch-independent
        sampled = sample_rows(probs, [self._uniform(requests[row]) for row in rows])
        if plan.sample_index is None:
            return sampled
        return argmax_rows(scores).index_copy_(0, plan.sample_index, sampled)

    def _uniform(self, request: Request) -> float:
        """The request's next uniform number in [0, 1): SplitMix64 of (its seed's key + the
        number of draws so far), 53 bits."""
        stream = self._streams.get(request.request_id)
        if stream is None:
            seed = request.sampling.seed
            if seed is None:  # the server always assigns one; stay random if it did not
                seed = random.SystemRandom().getrandbits(63)
            stream = self._streams[request.request_id] = [_splitmix64(seed & _MASK64), 0]
        key, draws = stream
        stream[1] += 1
        return (_splitmix64((key + draws * 0x9E3779B97F4A7C15) & _MASK64) >> 11) * 2.0**-53


def _logprobs(
    scores: torch.Tensor, token_ids: torch.Tensor, plan: _BatchPlan
) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
    """Chosen-token logprobs and top tokens, from log_softmax(scores)."""
    num_rows = scores.shape[0]
    if not any(plan.want_logprobs):
        return [None] * num_rows, [[] for _ in range(num_rows)]
    chosen = chosen_logprobs(scores, token_ids).tolist()
    logprobs = [lp if want else None for lp, want in zip(chosen, plan.want_logprobs, strict=True)]
    if not any(plan.top_n):
        return logprobs, [[] for _ in range(num_rows)]
    return logprobs, top_tokens(scores - logsumexp_rows(scores), plan.top_n)


def top_tokens(logprobs: torch.Tensor, top_n: Sequence[int]) -> list[list[tuple[int, float]]]:
    """Each row's `top_n[i]` best (id, logprob), plus every token tied with the n-th (TGI).

    logprobs: [B, V]. A row whose n-th value is -inf keeps only its finite tokens.
    """
    rows = [i for i, n in enumerate(top_n) if n > 0]
    vocab = logprobs.shape[1]
    sub = logprobs[rows] if len(rows) < len(top_n) else logprobs
    ns = [min(top_n[i], vocab) for i in rows]
    best = torch.topk(sub, max(ns), dim=1).values  # [R, max_n] sorted
    nth = best.gather(1, torch.tensor(ns, device=sub.device).unsqueeze(1) - 1)  # [R, 1]
    nth.masked_fill_(nth == float("-inf"), torch.finfo(sub.dtype).min)
    counts = (sub >= nth).sum(dim=1)  # [R]: n plus ties
    k = int(counts.max())
    values, indices = torch.topk(sub, k, dim=1)
    out: list[list[tuple[int, float]]] = [[] for _ in top_n]
    for row, n, ids, vals in zip(
        rows, counts.tolist(), indices.tolist(), values.tolist(), strict=True
    ):
        out[row] = list(zip(ids[:n], vals[:n], strict=True))
    return out

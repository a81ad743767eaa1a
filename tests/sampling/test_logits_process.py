"""Batched logits processors against transformers' processors and hand-written TGI references,
on heterogeneous batches (rows with and without each processor)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from genserve.engine.request import Request
from genserve.sampling.logits_process import LogitsPipeline, TopP, count_tokens
from genserve.sampling.params import SamplingParams
from genserve.sampling.watermark import WatermarkConfig

VOCAB = 300


def make_request(i: int, params: SamplingParams, prompt_len: int = 7, gen_len: int = 5) -> Request:
    g = torch.Generator().manual_seed(1000 + i)
    # small id range so tokens repeat; includes id 0 in some rows
    prompt = torch.randint(0, 40, (prompt_len + i,), generator=g).tolist()
    req = Request(f"r{i}", prompt, sampling=params)
    for t in torch.randint(0, 40, (gen_len + (i % 3),), generator=g).tolist():
        req.append_output_token(t)
    return req


def random_logits(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, VOCAB, generator=g) * 3
    logits[:, :40] += 1.0  # the repeated ids carry both positive and negative logits
    return logits


def run(params: list[SamplingParams], logits: torch.Tensor, **kw) -> tuple[torch.Tensor, list]:
    requests = [make_request(i, p) for i, p in enumerate(params)]
    pipe = LogitsPipeline.build(requests, VOCAB, logits.device, **kw)
    assert pipe is not None
    before = logits.clone()
    out = pipe(logits, requests)
    assert torch.equal(logits, before), "the pipeline must not modify its input"
    return out, requests


def test_no_processor_means_no_pipeline():
    requests = [make_request(i, SamplingParams(do_sample=i % 2 == 0, seed=i)) for i in range(4)]
    assert LogitsPipeline.build(requests, VOCAB, torch.device("cpu")) is None


def test_count_tokens_ignores_out_of_range_and_empty_rows():
    counts = count_tokens([[1, 1, 2], [], [VOCAB, 3]], VOCAB, torch.device("cpu"))
    assert counts.shape == (3, VOCAB)
    assert counts[0, 1] == 2 and counts[0, 2] == 1 and counts[0].sum() == 3
    assert counts[1].sum() == 0
    assert counts[2, 3] == 1 and counts[2].sum() == 1


def test_repetition_penalty_matches_transformers():
    penalties = [1.0, 1.3, 0.7, 1.0, 2.0]
    logits = random_logits(len(penalties))
    out, requests = run([SamplingParams(repetition_penalty=p) for p in penalties], logits)
    for i, (p, req) in enumerate(zip(penalties, requests, strict=True)):
        ids = torch.tensor([req.all_token_ids])
        expected = RepetitionPenaltyLogitsProcessor(p)(ids, logits[i : i + 1].clone())[0]
        torch.testing.assert_close(out[i], expected, rtol=0, atol=0)


def test_tgi_frequency_penalty_matches_reference():
    penalties = [0.0, 0.5, -1.0, 2.0]
    logits = random_logits(len(penalties))
    out, requests = run([SamplingParams(frequency_penalty=p) for p in penalties], logits)
    for i, (p, req) in enumerate(zip(penalties, requests, strict=True)):
        expected = logits[i].clone()
        ids = req.all_token_ids  # prompt + generated, divided by this row's own length
        for tok in set(ids):
            expected[tok] -= p * ids.count(tok) / len(ids)
        torch.testing.assert_close(out[i], expected)


def test_openai_penalties_match_reference():
    cases = [
        (0.0, 0.0, True),
        (0.8, 0.0, True),
        (0.0, 1.5, True),
        (-0.5, 0.6, True),
        (0.4, 0.2, False),
    ]
    params = [
        SamplingParams(frequency_penalty=f, presence_penalty=pr, openai_penalties=oai)
        for f, pr, oai in cases
    ]
    logits = random_logits(len(params))
    out, requests = run(params, logits)
    for i, ((freq, presence, oai), req) in enumerate(zip(cases, requests, strict=True)):
        expected = logits[i].clone()
        gen = req.output_token_ids
        if not oai:  # TGI frequency over everything, presence still over generated ids
            for tok in set(req.all_token_ids):
                expected[tok] -= freq * req.all_token_ids.count(tok) / req.num_tokens
            freq = 0.0
        for tok in set(gen):
            expected[tok] -= freq * gen.count(tok) + presence
        torch.testing.assert_close(out[i], expected)


def test_logit_bias():
    biases = [{}, {5: 10.0, 7: -100.0}, {}, {0: 3.5, VOCAB + 10: 1.0}]
    logits = random_logits(len(biases))
    out, _ = run([SamplingParams(logit_bias=b) for b in biases], logits)
    expected = logits.clone()
    expected[1, 5] += 10.0
    expected[1, 7] -= 100.0
    expected[3, 0] += 3.5
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def reference_greenlist_mask(prev: int, vocab: int, gamma: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(15485863 * prev)
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[torch.randperm(vocab, generator=g)[: int(vocab * gamma)]] = True
    return mask


@pytest.mark.parametrize("gamma,delta", [(0.5, 2.0), (0.25, 4.0)])
def test_watermark_matches_reference(gamma, delta):
    flags = [True, False, True, True, False]
    logits = random_logits(len(flags))
    cfg = WatermarkConfig(gamma=gamma, delta=delta)
    out, requests = run([SamplingParams(watermark=f) for f in flags], logits, watermark=cfg)
    for i, (flag, req) in enumerate(zip(flags, requests, strict=True)):
        expected = logits[i].clone()
        if flag:
            mask = reference_greenlist_mask(req.all_token_ids[-1], VOCAB, gamma)
            assert int(mask.sum()) == int(VOCAB * gamma)
            expected[mask] += delta
        torch.testing.assert_close(out[i], expected, rtol=0, atol=0)


def transformers_warp(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """TGI's warper order with transformers' warpers, for one row."""
    warpers = []
    if p.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(p.typical_p))
    if p.min_p > 0.0:
        warpers.append(MinPLogitsWarper(p.min_p))
    scores = row.unsqueeze(0).clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    for w in warpers:
        scores = w(ids, scores)
    return scores[0]


WARPER_ROWS = [
    SamplingParams(),  # identity row
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.6),
    SamplingParams(top_k=1),
    SamplingParams(top_k=10),
    SamplingParams(top_k=VOCAB + 50),  # larger than the vocabulary
    SamplingParams(top_p=0.9),
    SamplingParams(top_p=0.3, temperature=0.8),
    SamplingParams(typical_p=0.5),
    SamplingParams(typical_p=0.95, top_k=50),
    SamplingParams(min_p=0.05),
    SamplingParams(min_p=0.2, temperature=1.3),
    SamplingParams(temperature=0.9, top_k=40, top_p=0.8, typical_p=0.9, min_p=0.02),
]


@pytest.mark.parametrize("only", [None, "temperature", "top_k", "top_p", "typical_p", "min_p"])
def test_warpers_match_transformers(only):
    rows = WARPER_ROWS
    if only is not None:  # a batch where only that warper is active, plus identity rows
        default = getattr(SamplingParams(), only)
        rows = [SamplingParams()] + [
            SamplingParams(**{only: getattr(p, only)}) for p in WARPER_ROWS
        ]
        rows = [p for p in rows if getattr(p, only) != default] + [SamplingParams()]
    logits = random_logits(len(rows), seed=7)
    out, _ = run(rows, logits)
    for i, p in enumerate(rows):
        torch.testing.assert_close(out[i], transformers_warp(logits[i], p), rtol=1e-6, atol=1e-6)


def test_top_k_keeps_ties_with_kth():
    logits = torch.tensor([[1.0, 5.0, 3.0, 3.0, 3.0, 0.0]])
    requests = [Request("a", [1], sampling=SamplingParams(top_k=2))]
    out = LogitsPipeline.build(requests, 6, logits.device)(logits, requests)
    assert torch.isinf(out[0, [0, 5]]).all()
    assert torch.equal(out[0, 1:5], logits[0, 1:5])


def test_full_pipeline_order():
    """Every processor in one heterogeneous batch, against the references in TGI's order."""
    params = [
        SamplingParams(),
        SamplingParams(repetition_penalty=1.2, frequency_penalty=0.3, temperature=0.8, top_k=20),
        SamplingParams(logit_bias={3: 2.0}, top_p=0.85, watermark=True),
        SamplingParams(
            frequency_penalty=0.5,
            presence_penalty=0.4,
            openai_penalties=True,
            typical_p=0.9,
            min_p=0.01,
        ),  # fmt: skip
    ]
    logits = random_logits(len(params), seed=3)
    out, requests = run(params, logits)
    for i, (p, req) in enumerate(zip(params, requests, strict=True)):
        row = logits[i].clone()
        if p.watermark:
            row[reference_greenlist_mask(req.all_token_ids[-1], VOCAB, 0.5)] += 2.0
        if p.repetition_penalty != 1.0:
            ids = torch.tensor([req.all_token_ids])
            row = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, row[None])[0]
        counts = count_tokens([req.all_token_ids], VOCAB, row.device)[0]
        gen = count_tokens([req.output_token_ids], VOCAB, row.device)[0]
        if p.openai_penalties:
            row = row - p.frequency_penalty * gen - p.presence_penalty * (gen > 0).float()
        else:
            row = row - p.frequency_penalty * counts / req.num_tokens
        for tok, b in p.logit_bias.items():
            row[tok] += b
        torch.testing.assert_close(out[i], transformers_warp(row, p), rtol=1e-5, atol=1e-5)


def test_top_p_nucleus_within_and_beyond_the_candidates(use_kernels_or_torch, monkeypatch):
    """Narrow and wide nuclei, and a top_p of 1 beside them, mask exactly what transformers'
    warper masks: through the native kernel (bucketed, no sort of the row), and through the
    PyTorch path (topk of `CANDIDATES`, a whole-row sort only where the nucleus is wider)."""
    monkeypatch.setattr(TopP, "CANDIDATES", 64)
    g = torch.Generator().manual_seed(5)
    peaked = torch.randn(2, 3000, generator=g) * 6  # nucleus of a few tokens
    flat = torch.randn(2, 3000, generator=g) * 0.1  # nucleus of thousands
    logits = torch.cat([peaked, flat, peaked[:1]])
    params = [SamplingParams(top_p=p) for p in (0.9, 0.5, 0.95, 0.3)] + [SamplingParams()]
    requests = [Request(f"p{i}", [1], sampling=p) for i, p in enumerate(params)]
    out = LogitsPipeline.build(requests, 3000, logits.device)(logits.clone(), requests)
    for i, p in enumerate(params):
        torch.testing.assert_close(out[i], transformers_warp(logits[i], p), rtol=0, atol=0)
    kept = (~torch.isinf(out)).sum(1).tolist()
    assert kept[0] < 64 and kept[2] > 64 and kept[4] == 3000, kept


def test_top_k_large_vocabulary_with_ties_and_masked_tokens(use_kernels_or_torch, monkeypatch):
    """The native k-th-value search (no sort, no topk) and the PyTorch path keep exactly what
    transformers' warper keeps: ties with the k-th, negative and -inf logits, k = 0 (row off)
    and k past the vocabulary in one batch."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(5, 20000, generator=g) * 3
    logits[1] = (logits[1] * 2).round() / 2  # thousands of ties
    logits[2, :15000] = float("-inf")
    ks = [1, 50, 4000, 0, 30000]
    requests = [Request(f"k{i}", [1], sampling=SamplingParams(top_k=k)) for i, k in enumerate(ks)]
    out = LogitsPipeline.build(requests, 20000, logits.device)(logits.clone(), requests)
    for i, k in enumerate(ks):
        expected = transformers_warp(logits[i], SamplingParams(top_k=k))
        torch.testing.assert_close(out[i], expected, rtol=0, atol=0)
    kept = (~torch.isinf(out)).sum(1).tolist()
    assert kept[0] == 1 and kept[1] >= 50 and kept[3] == kept[4] == 20000, kept

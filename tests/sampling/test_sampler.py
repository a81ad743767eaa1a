"""Sampler: greedy argmax, seeded sampling independent of the batch, logprobs after warping,
top tokens with ties."""

from __future__ import annotations

import math

import pytest
import torch

from genserve.engine.request import Request
from genserve.sampling import sampler as sampler_module
from genserve.sampling.params import SamplingParams
from genserve.sampling.sampler import Sampler, sample_rows, top_tokens
from genserve.sampling.watermark import WatermarkConfig

VOCAB = 500


def row_logits(key: int, step: int) -> torch.Tensor:
    """A fixed [VOCAB] logits row per (request, step), whatever batch it lands in."""
    g = torch.Generator().manual_seed(key * 1_000 + step)
    return torch.randn(VOCAB, generator=g) * 2


def test_greedy_is_argmax_with_no_processor():
    sampler = Sampler(VOCAB)
    requests = [Request(f"g{i}", [1, 2, 3]) for i in range(6)]
    logits = torch.stack([row_logits(i, 0) for i in range(6)])
    out = sampler(logits, requests)
    assert out.token_ids == logits.argmax(1).tolist()
    assert sampler._plan.pipeline is None and not sampler._plan.sample_rows
    expected = torch.log_softmax(logits, 1).gather(1, logits.argmax(1, keepdim=True))[:, 0]
    torch.testing.assert_close(torch.tensor(out.logprobs), expected)
    assert out.top_tokens == [[]] * 6
    assert not sampler._streams  # greedy rows never get a random stream


def test_logprobs_off_and_padded_vocab():
    sampler = Sampler(VOCAB)
    requests = [Request("a", [1], sampling=SamplingParams(logprobs=False))]
    logits = torch.cat([row_logits(1, 0), torch.full((12,), 100.0)]).unsqueeze(0)
    out = sampler(logits, requests)  # columns past vocab_size are never chosen
    assert out.token_ids == [int(row_logits(1, 0).argmax())]
    assert out.logprobs == [None]


MIXED = [
    SamplingParams(),  # greedy
    SamplingParams(do_sample=True, seed=11),
    SamplingParams(temperature=0.7, top_k=50, seed=12),  # do_sample forced by the warpers
    SamplingParams(repetition_penalty=1.3),  # greedy with a processor
    SamplingParams(do_sample=True, top_p=0.9, seed=13, top_n_tokens=3),
    SamplingParams(typical_p=0.8, min_p=0.05, seed=14, frequency_penalty=0.5),
    SamplingParams(do_sample=True, seed=15, watermark=True, logit_bias={7: 5.0}),
    SamplingParams(temperature=1.5, seed=16, presence_penalty=1.0, openai_penalties=True),
]


def generate(sampler: Sampler, requests: list[Request], keys: list[int], steps: int):
    """Runs `steps` steps; returns per-request (token ids, logprobs)."""
    for step in range(steps):
        logits = torch.stack([row_logits(k, step) for k in keys])
        out = sampler(logits, requests)
        for req, tok in zip(requests, out.token_ids, strict=True):
            req.append_output_token(tok)
    return [r.output_token_ids for r in requests]


@pytest.fixture(scope="module")
def mixed_batch_tokens() -> list[list[int]]:
    batch = [Request(f"b{i}", [3, 4, 5], sampling=p) for i, p in enumerate(MIXED)]
    return generate(Sampler(VOCAB), batch, list(range(len(MIXED))), steps=12)


@pytest.mark.parametrize("row", [1, 2, 4, 5, 6, 7])
def test_seeded_row_same_alone_and_in_mixed_batch(mixed_batch_tokens, row):
    alone = generate(Sampler(VOCAB), [Request("x", [3, 4, 5], sampling=MIXED[row])], [row], 12)
    assert mixed_batch_tokens[row] == alone[0]
    assert len(set(alone[0])) > 3  # it really samples


def test_seeded_row_same_when_batch_composition_changes():
    """The same request moves between batches of different sizes and orders across steps."""
    params = SamplingParams(do_sample=True, seed=99, temperature=0.9)
    ref_req = Request("ref", [1], sampling=params)
    generate(Sampler(VOCAB), [ref_req], [42], steps=8)
    sampler = Sampler(VOCAB)
    req = Request("moving", [1], sampling=params)
    others = [Request(f"o{i}", [1], sampling=MIXED[i]) for i in range(len(MIXED))]
    for step in range(8):
        batch = others[: step % 5] + [req] + others[step % 5 :][: step % 3]
        keys = [hash(r.request_id) % 97 for r in batch]
        keys[batch.index(req)] = 42
        logits = torch.stack([row_logits(k, step) for k in keys])
        out = sampler(logits, batch)
        req.append_output_token(out.token_ids[batch.index(req)])
    assert req.output_token_ids == ref_req.output_token_ids


def test_same_seed_same_tokens_and_release():
    sampler = Sampler(VOCAB)
    params = SamplingParams(do_sample=True, seed=5)
    a, b = Request("a", [1], sampling=params), Request("b", [1], sampling=params)
    assert generate(sampler, [a, b], [1, 1], steps=6)[0] == b.output_token_ids
    assert set(sampler._streams) == {"a", "b"}
    sampler.release("a")
    sampler.release("unknown")
    assert set(sampler._streams) == {"b"}


def test_unseeded_sampling_still_samples():
    requests = [Request(f"u{i}", [1], sampling=SamplingParams(do_sample=True)) for i in range(2)]
    logits = torch.zeros(2, VOCAB)  # uniform: two random draws almost surely differ somewhere
    tokens = [Sampler(VOCAB)(logits, requests).token_ids for _ in range(5)]
    assert len({tuple(t) for t in tokens}) > 1


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    n = 3000
    requests = [
        Request(f"s{i}", [0], sampling=SamplingParams(do_sample=True, seed=i)) for i in range(n)
    ]
    out = Sampler(3)(probs.log().expand(n, 3).contiguous(), requests)
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=3).float() / n
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


def test_logprobs_are_after_warping():
    logits = torch.stack([row_logits(1, 0), row_logits(2, 0), row_logits(3, 0)])
    params = [
        SamplingParams(temperature=0.5, seed=1),
        SamplingParams(top_k=1, seed=2),  # only one token left: logprob 0
        SamplingParams(temperature=2.0, top_k=5, seed=3),
    ]
    requests = [Request(f"w{i}", [1], sampling=p) for i, p in enumerate(params)]
    out = Sampler(VOCAB)(logits, requests)
    assert out.logprobs[1] == 0.0 and out.token_ids[1] == int(logits[1].argmax())
    warped0 = torch.log_softmax(logits[0] / 0.5, 0)
    assert math.isclose(out.logprobs[0], float(warped0[out.token_ids[0]]), rel_tol=1e-5)
    top5 = torch.topk(logits[2], 5)
    assert out.token_ids[2] in top5.indices.tolist()
    warped2 = torch.log_softmax(top5.values / 2.0, 0)
    expected = float(warped2[top5.indices.tolist().index(out.token_ids[2])])
    assert math.isclose(out.logprobs[2], expected, rel_tol=1e-5)


def test_top_tokens_include_ties():
    logits = torch.tensor(
        [
            [5.0, 4.0, 3.0, 3.0, 3.0, 1.0],  # top 3 -> 5 tokens (ties at the 3rd value)
            [0.0, 2.0, 1.0, 2.0, 0.5, 0.1],  # top 1 -> 2 tokens tied first
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # no top tokens asked
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # top 2 -> exactly 2
        ]
    )
    top_n = [3, 1, 0, 2]
    requests = [
        Request(f"t{i}", [0], sampling=SamplingParams(top_n_tokens=n)) for i, n in enumerate(top_n)
    ]
    out = Sampler(6)(logits, requests)
    logprobs = torch.log_softmax(logits, 1)
    ids = [[t for t, _ in row] for row in out.top_tokens]
    assert ids[0][:2] == [0, 1] and sorted(ids[0][2:]) == [2, 3, 4]
    assert sorted(ids[1]) == [1, 3]
    assert ids[2] == []
    assert ids[3] == [5, 4]
    for r, row in enumerate(out.top_tokens):
        for tok, lp in row:
            assert math.isclose(lp, float(logprobs[r, tok]), rel_tol=1e-6)


def test_top_tokens_skip_filtered_tokens():
    """After top_k, -inf tokens never pad the top tokens (TGI's finfo.min guard)."""
    logprobs = torch.tensor([[0.0, float("-inf"), float("-inf"), float("-inf")]])
    assert top_tokens(logprobs, [3]) == [[(0, 0.0)]]


def test_watermark_config_reaches_pipeline():
    sampler = Sampler(VOCAB, watermark=WatermarkConfig(gamma=0.25, delta=3.0))
    req = Request("wm", [1, 2], sampling=SamplingParams(watermark=True))
    sampler(row_logits(0, 0).unsqueeze(0), [req])
    assert sampler._plan.pipeline.watermark.config.gamma == 0.25


def test_sample_rows_inverse_cdf(use_kernels_or_torch):
    """u picks the first token whose running probability passes u (times the row's sum):
    zero-probability tokens are never picked, whatever u; the native pass and the PyTorch one
    agree away from the boundaries between tokens."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.25, 0.0]] * 5 + [[0.0] * 5 + [2.0]])
    u = [0.0, 0.49, 0.51, 0.8, 0.999999, 0.3]
    assert sample_rows(probs, u).tolist() == [1, 1, 3, 4, 4, 5]
    wide = torch.softmax(torch.randn(3, 49152, generator=torch.Generator().manual_seed(3)), 1)
    wide[:, ::2] = 0  # masked tokens (top-k, grammar) stay out
    picks = sample_rows(wide, [0.1, 0.5, 0.9])
    assert all(wide[i, t] > 0 for i, t in enumerate(picks.tolist()))
    cdf = wide.double().cumsum(1) / wide.double().sum(1, keepdim=True)
    expected = [int((cdf[i] <= q).sum()) for i, q in enumerate([0.1, 0.5, 0.9])]
    assert picks.tolist() == expected


def test_logsumexp_rows_matches_torch(use_kernels_or_torch):
    """The native row logsumexp (logprobs of every non-greedy step) against torch.logsumexp:
    masked tokens, a fully masked row (-inf), a row holding +inf, a strided view."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 49152 + 100, generator=g) * 5
    x[1, :40000] = float("-inf")
    x[2] = float("-inf")
    x[3, 17] = float("inf")
    view = x[:, :49152]  # columns past the vocabulary: a row stride wider than the row
    got, expected = sampler_module.logsumexp_rows(view), view.logsumexp(dim=1, keepdim=True)
    assert got.shape == expected.shape == (6, 1)
    assert got[2].item() == float("-inf") and got[3].item() == float("inf")
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-6, atol=1e-5)

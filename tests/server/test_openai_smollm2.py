"""The real SmolLM2-135M-Instruct (float32) behind `/v1/chat/completions`, through its real
ChatML template: it answers, and the server renders prompts exactly as transformers does."""

from __future__ import annotations

import httpx
import openai
import pytest
from real_server import real_server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2_dir):
    # float32: in bfloat16 a near-tie flips the greedy answer
    with real_server(smollm2_dir, engine_kw={"dtype": "float32"}) as (url, engine):
        yield url


def test_greedy_capital_of_france(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="-", max_retries=0, timeout=120)
    out = client.chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=0, max_tokens=24
    )
    assert "Paris" in out.choices[0].message.content, out.choices[0].message.content
    chunks = client.chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=0, max_tokens=24, stream=True
    )
    streamed = "".join(c.choices[0].delta.content for c in chunks)
    assert streamed == out.choices[0].message.content
    if out.choices[0].finish_reason == "stop":  # EOS: OpenAI's word for it
        assert out.usage.completion_tokens < 24


@pytest.mark.parametrize(
    "messages",
    [
        QUESTION,
        [{"role": "system", "content": "Answer in French."}, *QUESTION],
        [
            *QUESTION,
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And Italy?"},
        ],
        [*QUESTION, {"role": "assistant", "content": "The capital of France is"}],
    ],
    ids=["user", "system", "multi-turn", "continue"],
)
def test_prompt_equals_transformers(server, smollm2_dir, messages):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(smollm2_dir)
    cont = messages[-1]["role"] == "assistant"
    expected = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=not cont, continue_final_message=cont
    )
    body = httpx.post(f"{server}/chat_tokenize", json={"messages": messages}, timeout=60).json()
    assert body["templated_text"] == expected
    ids = hf(expected, add_special_tokens=False)["input_ids"]
    assert [t["id"] for t in body["tokenize_response"]] == ids

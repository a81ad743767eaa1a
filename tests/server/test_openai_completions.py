"""`/v1/completions`, `/v1/models`, `/chat_tokenize`, `/invocations` and client disconnects on the
real server (tiny random Llama), through the openai SDK and plain HTTP."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from real_server import real_server
from tgi_schema import validate

from genserve.engine.block_manager import BlockManager


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with real_server(tiny_llama_dir, enable_prefill_logprobs=True) as (url, engine):
        yield url, engine


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="-", max_retries=0, timeout=60)


def complete(client: openai.OpenAI, prompt, **kw):
    return client.completions.create(model="tgi", prompt=prompt, temperature=0, **kw)


def test_list_of_prompts(server, client):
    prompts = ["The cat", "Once upon a time", "1, 2, 3,"]
    out = complete(client, prompts, max_tokens=5)
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert [c.index for c in out.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, out.choices, strict=True):
        alone = complete(client, prompt, max_tokens=5).choices[0]
        assert choice.text == alone.text and choice.finish_reason == alone.finish_reason
    singles = [complete(client, p, max_tokens=5).usage for p in prompts]
    assert out.usage.prompt_tokens == sum(u.prompt_tokens for u in singles)
    assert out.usage.completion_tokens == sum(u.completion_tokens for u in singles)
    raw = httpx.post(f"{server[0]}/v1/completions", json={"prompt": prompts, "max_tokens": 2})
    assert "x-compute-time" not in raw.headers and raw.headers["x-generated-tokens"] == "6"
    validate(raw.json(), "CompletionFinal")


def test_stream_interleaves_prompts(server, client):
    prompts = ["The cat", "Once upon a time"]
    full = complete(client, prompts, max_tokens=6)
    texts = {0: "", 1: ""}
    finished = []
    for chunk in complete(client, prompts, max_tokens=6, stream=True):
        (c,) = chunk.choices
        texts[c.index] += c.text
        if c.finish_reason is not None:
            finished.append(c.index)
            assert chunk.usage.completion_tokens == 6  # TGI: the last chunk of a prompt
    assert sorted(finished) == [0, 1]
    assert [texts[0], texts[1]] == [c.text for c in full.choices]
    body = {"prompt": prompts, "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{server[0]}/v1/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]" and len(lines) == 5
    finals = [json.loads(line[6:]) for line in lines[:-1]]
    for chunk in finals:
        if chunk["choices"][0]["finish_reason"] is not None:
            validate(chunk, "CompletionFinal")  # TGI's last chunk of a prompt


def test_n_seed_and_usage_chunk(client):
    kw = dict(model="tgi", prompt=["a", "b"], max_tokens=4, temperature=1.0, seed=3, n=2)
    out = client.completions.create(**kw)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]  # prompt p, choice j -> p * n + j
    again = client.completions.create(**kw)
    assert [c.text for c in out.choices] == [c.text for c in again.choices]
    chunks = list(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_logprobs_echo_stop(client):
    out = complete(client, "The cat", max_tokens=4, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == out.choices[0].text and lp.text_offset[0] == 0
    assert all(len(top) >= 2 for top in lp.top_logprobs)
    echoed = complete(client, "The cat", max_tokens=4, logprobs=1, echo=True)
    choice = echoed.choices[0]
    assert choice.text == "The cat" + out.choices[0].text
    assert choice.logprobs.token_logprobs[0] is None  # nothing predicts the first token
    assert len(choice.logprobs.tokens) == echoed.usage.prompt_tokens + 4
    stop = out.choices[0].text.split()[-1]  # before the length limit of 8
    cut = complete(client, "The cat", max_tokens=8, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == out.choices[0].text[: out.choices[0].text.index(stop)]


def test_completion_errors(server, client):
    url = server[0]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "suffix": "b"})
    assert r.status_code == 422 and r.json() == {
        "error": "Suffix is not supported and can be achieved by preprocessing the prompt.",
        "error_type": "suffix not supported",
    }
    r = httpx.post(f"{url}/v1/completions", json={"prompt": list("abcde")})
    assert r.status_code == 422 and r.json()["error_type"] == "batch size exceeded"
    assert r.json()["error"] == "Number of prompts exceeds the maximum allowed batch size of 4"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": []})
    assert r.status_code == 422 and "Empty array detected" in r.json()["error"]
    with pytest.raises(openai.UnprocessableEntityError, match="422"):
        complete(client, "a", max_tokens=2, top_p=1.5)  # checked even when greedy
    with pytest.raises(openai.UnprocessableEntityError):
        complete(client, "a", max_tokens=2, best_of=3)


def test_models_invocations_chat_tokenize(server, client):
    url = server[0]
    (model,) = client.models.list().data
    assert model.object == "model" and model.owned_by == model.id
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    r = httpx.post(f"{url}/invocations", json=chat)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    r = httpx.post(f"{url}/invocations", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["object"] == "text_completion"
    r = httpx.post(f"{url}/invocations", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200 and "generated_text" in r.json()[0]
    r = httpx.post(f"{url}/chat_tokenize", json=chat)
    body = r.json()
    validate(body, "ChatTokenizeResponse")
    assert body["templated_text"].endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = [t["id"] for t in body["tokenize_response"]]
    text = "".join(t["text"] for t in body["tokenize_response"])
    assert text == body["templated_text"] and len(ids) > 5
    cont = {"messages": [*chat["messages"], {"role": "assistant", "content": "Hello there"}]}
    body = httpx.post(f"{url}/chat_tokenize", json=cont).json()
    assert body["templated_text"].endswith("<|im_start|>assistant\nHello there")


def _idle(engine, timeout: float = 10.0) -> float:
    t0 = time.monotonic()
    while engine.num_running or engine.num_waiting:
        assert time.monotonic() - t0 < timeout, "requests left in the engine"
        time.sleep(0.02)
    return time.monotonic() - t0


def _blocks_free(engine) -> None:
    bm = engine.engine.block_manager
    assert isinstance(bm, BlockManager)
    bm.check_integrity()
    assert bm.num_used_blocks == 0


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_disconnect_aborts_every_choice(server, route):
    url, engine = server
    # greedy: a sampled EOS could end every choice before the check below
    body = {"max_tokens": 400, "n": 3, "stream": True, "prompt": ["Tell", "me"], "temperature": 0}
    if route.endswith("chat/completions"):
        body = {**body, "messages": [{"role": "user", "content": "Tell me a story"}]}
    with httpx.stream("POST", f"{url}{route}", json=body, timeout=60) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: {") and '"error"' not in first, first
        assert engine.num_running + engine.num_waiting > 1, first
    assert _idle(engine) < 5.0
    _blocks_free(engine)
    body["stream"] = False
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}{route}", json=body, timeout=0.5)
    _idle(engine)
    _blocks_free(engine)


def test_async_completions(server):
    async def go():
        client = openai.AsyncOpenAI(base_url=f"{server[0]}/v1", api_key="-", max_retries=0)
        kw = dict(model="tgi", prompt=["x", "y"], max_tokens=3, temperature=0)
        out = await client.completions.create(**kw)
        stream = await client.completions.create(stream=True, **kw)
        chunks = [c async for c in stream]
        return out, chunks

    out, chunks = asyncio.run(go())
    texts = {0: "", 1: ""}
    for c in chunks:
        texts[c.choices[0].index] += c.choices[0].text
    assert [texts[0], texts[1]] == [c.text for c in out.choices]

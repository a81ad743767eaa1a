"""`/v1/chat/completions` through real clients (openai SDK sync and async, huggingface_hub's
InferenceClient) against the real server and engine (tiny random Llama, SmolLM2's template)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient
from tgi_schema import validate

HI = [{"role": "user", "content": "Tell me about cheese."}]


def greedy(client: openai.OpenAI, **kw):
    return client.chat.completions.create(
        model="tgi", messages=kw.pop("messages", HI), temperature=0, **kw
    )


def test_non_stream_shape_and_schema(server, client):
    out = greedy(client, max_tokens=6)
    (choice,) = out.choices
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    assert out.system_fingerprint.endswith("-native") and out.model
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None
    assert out.usage.completion_tokens <= 6
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.usage.prompt_tokens_details.cached_tokens >= 0
    assert greedy(client, max_tokens=2).id != out.id
    echoed = client.chat.completions.create(model="my-model", messages=HI, max_tokens=1)
    assert echoed.model == "my-model"
    raw = httpx.post(f"{server[0]}/v1/chat/completions", json={"messages": HI, "max_tokens": 3})
    assert raw.status_code == 200 and raw.headers["x-generated-tokens"] == "3"
    validate(raw.json(), "ChatCompletion")


def test_stream_assembles_to_the_same_text(server, client):
    full = greedy(client, max_tokens=12)
    chunks = list(greedy(client, max_tokens=12, stream=True))
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    )
    assert [c.choices[0].finish_reason for c in chunks][-1] == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    body = {"messages": HI, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server[0]}/v1/chat/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        validate(json.loads(line[6:]), "ChatCompletionChunk")


def test_include_usage(client):
    chunks = list(greedy(client, max_tokens=5, stream=True, stream_options={"include_usage": True}))
    *tokens, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == len(tokens)
    assert last.usage.prompt_tokens_details.cached_tokens >= 0
    assert all(c.usage is None for c in tokens)


def test_n_choices_and_seeds(client):
    kw = dict(model="tgi", messages=HI, max_tokens=8, temperature=1.0, seed=7)
    three = client.chat.completions.create(n=3, **kw)
    assert [c.index for c in three.choices] == [0, 1, 2]
    one = client.chat.completions.create(n=1, **kw)
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert 3 <= three.usage.completion_tokens <= 24  # every choice's tokens
    again = client.chat.completions.create(n=1, **kw)
    assert one.choices[0].message.content == again.choices[0].message.content
    assert three.choices[0].message.content == one.choices[0].message.content
    assert len({c.message.content for c in three.choices}) > 1
    other = client.chat.completions.create(**{**kw, "seed": 8})
    assert other.choices[0].message.content != one.choices[0].message.content
    streamed = list(client.chat.completions.create(n=3, stream=True, **kw))
    texts = {i: "" for i in range(3)}
    for chunk in streamed:
        (c,) = chunk.choices
        texts[c.index] += c.delta.content or ""
    assert [texts[i] for i in range(3)] == [c.message.content for c in three.choices]
    finished = [c.choices[0].index for c in streamed if c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1, 2]


def test_logprobs(client):
    out = greedy(client, max_tokens=6, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) >= 3
        best = max(t.logprob for t in entry.top_logprobs)
        assert entry.logprob == pytest.approx(best, abs=1e-4)  # greedy picks the best
    text = "".join(e.token for e in content)
    assert text.startswith(out.choices[0].message.content[:5])
    chunks = list(greedy(client, max_tokens=4, logprobs=True, top_logprobs=2, stream=True))
    assert all(len(c.choices[0].logprobs.content) == 1 for c in chunks)


def test_stop_sequence_is_left_out(client):
    base = greedy(client, max_tokens=16).choices[0].message.content
    words = base.split()
    assert len(words) >= 3, base
    stop = words[2]
    expected = base[: base.index(stop)]
    out = greedy(client, max_tokens=16, stop=stop)
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content == expected
    chunks = list(greedy(client, max_tokens=16, stop=[stop, "\u2603"], stream=True))
    assert "".join(c.choices[0].delta.content for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_top_p_one_and_content_parts(client):
    parts = [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "about cheese."}]
    a = greedy(client, max_tokens=5, messages=[{"role": "user", "content": parts}])
    b = greedy(client, max_tokens=5, top_p=1.0)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_logit_bias(server, client):
    ids = httpx.post(f"{server[0]}/tokenize", json={"inputs": " cheese"}).json()
    token = ids[-1]
    out = greedy(client, max_tokens=4, logit_bias={str(token["id"]): 100})
    assert out.choices[0].message.content == token["text"] * 4
    banned = greedy(client, max_tokens=1, logprobs=True)
    first = banned.choices[0].logprobs.content[0].token
    ids = httpx.post(f"{server[0]}/tokenize", json={"inputs": first}).json()
    if len(ids) == 1:
        again = greedy(client, max_tokens=1, logit_bias={str(ids[0]["id"]): -100})
        assert again.choices[0].message.content != first


def _refused(client, exc_type, match: str, **kw) -> dict:
    """The SDK's exception; its `body` is the `error` text of TGI's error JSON."""
    with pytest.raises(exc_type) as info:
        greedy(client, **{"max_tokens": 2, **kw})
    assert match in info.value.body, info.value.body
    return info.value.response.json()


def test_errors_are_sdk_exceptions(client):
    unprocessable = openai.UnprocessableEntityError
    body = _refused(client, unprocessable, "`top_n_tokens` must be", logprobs=True, top_logprobs=9)
    assert body["error_type"] == "validation"
    tools = [{"type": "function", "function": {"name": "f"}}]
    _refused(client, unprocessable, "Tool with name g not found", tools=tools, tool_choice="g")
    _refused(client, unprocessable, "`response_format.type`", response_format={"type": "yaml"})
    image = {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    messages = [{"role": "user", "content": [image]}]
    _refused(client, unprocessable, "text-only", messages=messages)
    _refused(client, unprocessable, "`presence_penalty`", presence_penalty=3.0)
    _refused(client, unprocessable, "`stop` supports up to 4", stop=list("abcde"), stream=True)
    # 9 > 8 permits: it could never be admitted, so a 422, not a 429 to retry (issue 8)
    body = _refused(client, unprocessable, "at most 8 run concurrently", n=9)
    assert body["error_type"] == "validation"


def test_error_after_the_stream_started(server, client):
    engine = server[1].engine

    def fault(out):
        for s in out.scheduled:
            if s.request.sampling.seed == 999 and s.request.num_output_tokens >= 2:
                raise RuntimeError("injected fault")

    engine.fault_hook = fault
    try:
        stream = greedy(client, max_tokens=10, seed=999, stream=True)
        got = []
        with pytest.raises(openai.APIError, match="injected fault"):
            for chunk in stream:
                got.append(chunk)
        assert len(got) == 2
    finally:
        engine.fault_hook = None
    assert greedy(client, max_tokens=2).choices[0].finish_reason == "length"


def test_async_client(server):
    async def go():
        client = openai.AsyncOpenAI(base_url=f"{server[0]}/v1", api_key="-", max_retries=0)
        kw = dict(model="tgi", messages=HI, max_tokens=6, temperature=0)
        full, stream = await asyncio.gather(
            client.chat.completions.create(**kw),
            client.chat.completions.create(stream=True, **kw),
        )
        text = "".join([c.choices[0].delta.content async for c in stream])
        with pytest.raises(openai.UnprocessableEntityError):
            await client.chat.completions.create(**{**kw, "max_tokens": 0})
        models = await client.models.list()
        return full, text, models

    full, text, models = asyncio.run(go())
    assert full.choices[0].message.content == text
    assert [m.id for m in models.data] == [models.data[0].owned_by]


def test_huggingface_hub_client(server):
    client = InferenceClient(base_url=f"{server[0]}/v1/")
    out = client.chat.completions.create(model="tgi", messages=HI, max_tokens=6, temperature=0)
    assert isinstance(out.choices[0].message.content, str)
    assert out.usage.completion_tokens <= 6
    text = ""
    for chunk in client.chat.completions.create(
        model="tgi", messages=HI, max_tokens=6, temperature=0, stream=True
    ):
        text += chunk.choices[0].delta.content or ""
    assert text == out.choices[0].message.content

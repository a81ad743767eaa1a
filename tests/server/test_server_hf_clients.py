"""huggingface_hub's InferenceClient / AsyncInferenceClient against the real server."""

from __future__ import annotations

import asyncio

import pytest
from huggingface_hub import AsyncInferenceClient, InferenceClient
from huggingface_hub.errors import OverloadedError, ValidationError
from real_server import real_server


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with real_server(tiny_llama_dir, max_concurrent_requests=3) as (url, engine):
        yield url, engine


@pytest.fixture()
def client(server):
    return InferenceClient(server[0])


def test_plain_and_stream_agree(client):
    text = client.text_generation("How do you make cheese?", max_new_tokens=12)
    assert isinstance(text, str) and text
    pieces = list(client.text_generation("How do you make cheese?", max_new_tokens=12, stream=True))
    assert len(pieces) == 12 and all(isinstance(p, str) for p in pieces)
    # `/` defaults return_full_text to true (no pipeline tag known), as TGI does
    assert text.startswith("How do you make cheese?")


def test_details(client):
    out = client.text_generation("Hello", max_new_tokens=5, details=True, return_full_text=False)
    assert out.details.generated_tokens == 5
    assert len(out.details.tokens) == 5
    assert out.details.finish_reason == "length"
    assert isinstance(out.generated_text, str)


def test_stream_with_details(client):
    events = list(client.text_generation("Hello", max_new_tokens=4, details=True, stream=True))
    assert len(events) == 4
    assert all(e.token.id >= 0 for e in events)
    assert events[-1].details.generated_tokens == 4 and events[-1].generated_text is not None
    assert events[0].details is None


def test_stop_sequence(client):
    base = client.text_generation(
        "Once upon a time", max_new_tokens=10, return_full_text=False, details=True
    )
    words = [t.text for t in base.details.tokens if t.text.strip() and not t.special]
    assert words, base
    stop = words[min(2, len(words) - 1)].strip()
    out = client.text_generation(
        "Once upon a time", max_new_tokens=10, stop=[stop], return_full_text=False, details=True
    )
    assert out.details.finish_reason == "stop_sequence"
    assert out.generated_text.endswith(stop)  # TGI keeps the stop sequence


def test_seed_reproducible(client):
    kw = dict(max_new_tokens=8, do_sample=True, seed=42, details=True, return_full_text=False)
    a = client.text_generation("Tell me", **kw)
    b = client.text_generation("Tell me", **kw)
    assert a.generated_text == b.generated_text
    assert [t.id for t in a.details.tokens] == [t.id for t in b.details.tokens]
    assert a.details.seed == 42


def test_validation_errors_are_library_errors(client):
    with pytest.raises(ValidationError, match="`top_p` must be > 0.0 and < 1.0"):
        client.text_generation("x", max_new_tokens=2, top_p=1.0)
    with pytest.raises(ValidationError, match="`temperature` must be strictly positive"):
        list(client.text_generation("x", max_new_tokens=2, temperature=0.0, stream=True))


def test_async_client_and_overloaded(server):
    async def go():
        client = AsyncInferenceClient(server[0])
        text = await client.text_generation("Hi", max_new_tokens=3)
        assert isinstance(text, str)
        pieces = [
            p async for p in await client.text_generation("Hi", max_new_tokens=3, stream=True)
        ]
        assert len(pieces) == 3
        calls = [client.text_generation("Hi there", max_new_tokens=40) for _ in range(12)]
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(go())
    assert any(isinstance(r, OverloadedError) for r in results), results
    assert any(isinstance(r, str) for r in results)
    assert not [
        r for r in results if isinstance(r, Exception) and not isinstance(r, OverloadedError)
    ]

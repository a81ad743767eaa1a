"""Every TGI validation rule over real HTTP: exact message, status and error JSON."""

from __future__ import annotations

import httpx
import pytest
from fake_engine import FakeEngine
from server_harness import serve

from genserve.server.app import build_app
from genserve.server.settings import ServerSettings

SETTINGS = ServerSettings(
    model_id="fake", max_input_tokens=8, max_total_tokens=16, max_best_of=2, max_stop_sequences=2
)


@pytest.fixture(scope="module")
def client():
    engine = FakeEngine()
    with serve(build_app(engine, SETTINGS)) as url, httpx.Client(base_url=url, timeout=30) as c:
        yield c


def _v(msg: str) -> str:
    return f"Input validation error: {msg}"


RULES = [
    ({"best_of": 2}, _v("you must use sampling when `best_of` is > 1")),
    ({"temperature": 0.0}, _v("`temperature` must be strictly positive")),
    ({"temperature": -1}, _v("`temperature` must be strictly positive")),
    ({"repetition_penalty": 0}, _v("`repetition_penalty` must be strictly positive")),
    ({"frequency_penalty": 2.5}, _v("`frequency_penalty` must be >= -2.0 and <= 2.0")),
    ({"frequency_penalty": -2.1}, _v("`frequency_penalty` must be >= -2.0 and <= 2.0")),
    ({"top_p": 1.0}, _v("`top_p` must be > 0.0 and < 1.0")),
    ({"top_p": 0.0}, _v("`top_p` must be > 0.0 and < 1.0")),
    ({"typical_p": 1.0}, _v("`typical_p` must be > 0.0 and < 1.0")),
    ({"top_k": 0}, _v("`top_k` must be strictly positive")),
    ({"top_k": -3}, _v("`top_k` must be strictly positive")),
    ({"max_new_tokens": 0}, _v("`max_new_tokens` must be strictly positive")),
    ({"stop": ["a", "b", "c"]}, _v("`stop` supports up to 2 stop sequences. Given: 3")),
    ({"best_of": 2, "do_sample": True, "seed": 1}, _v("`seed` must not be set when `best_of` > 1")),
    ({"top_n_tokens": 6}, _v("`top_n_tokens` must be >= 0 and <= 5. Given: 6")),
    ({"truncate": 0}, _v("`truncate` must be strictly positive and less than 8. Given: 0")),
    ({"truncate": 9}, _v("`truncate` must be strictly positive and less than 8. Given: 9")),
    ({"best_of": 3, "do_sample": True}, _v("`best_of` must be > 0 and <= 2. Given: 3")),
    # the fake tokenizer has no `tokenizers` backend to compile grammars against
    ({"grammar": {"type": "regex", "value": "a+"}}, _v("grammar is not supported")),
]


@pytest.mark.parametrize(("params", "message"), RULES)
def test_rule(client, params, message):
    r = client.post("/generate", json={"inputs": "hello", "parameters": params})
    assert r.status_code == 422
    assert r.json() == {"error": message, "error_type": "validation"}


def test_order_best_of_sampling_before_temperature(client):
    r = client.post(
        "/generate", json={"inputs": "x", "parameters": {"best_of": 2, "temperature": 0}}
    )
    assert r.json()["error"] == _v("`temperature` must be strictly positive")
    r = client.post("/generate", json={"inputs": "", "parameters": {"top_k": 0}})
    assert r.json()["error"] == _v("`top_k` must be strictly positive")


def test_empty_inputs(client):
    r = client.post("/generate", json={"inputs": "", "parameters": {}})
    assert (r.status_code, r.json()["error"]) == (422, _v("`inputs` cannot be empty"))


def test_total_tokens_checked_before_input_length(client):
    # fake tokenizer: BOS + one token per word
    words = " ".join(["w"] * 12)
    r = client.post("/generate", json={"inputs": words, "parameters": {"max_new_tokens": 10}})
    assert r.json()["error"] == _v(
        "`inputs` tokens + `max_new_tokens` must be <= 16. Given: 13 `inputs` tokens and 10 `max_new_tokens`"
    )
    r = client.post("/generate", json={"inputs": words, "parameters": {"max_new_tokens": 2}})
    assert r.json()["error"] == _v("`inputs` must have less than 8 tokens. Given: 13")


def test_truncate_keeps_last_tokens_and_default_max_new_tokens(client):
    words = " ".join(["w"] * 12)
    r = client.post(
        "/generate", json={"inputs": words, "parameters": {"truncate": 4, "details": True}}
    )
    assert r.status_code == 200
    assert r.headers["x-prompt-tokens"] == "4"
    assert r.json()["details"]["generated_tokens"] == 16 - 4  # unset -> max_total - input


def test_stream_only_rules_arrive_as_sse_events(client):
    for params, msg in [
        (
            {"best_of": 2, "do_sample": True},
            "`best_of` != 1 is not supported when streaming tokens",
        ),
        (
            {"decoder_input_details": True},
            "`decoder_input_details` == true is not supported when streaming tokens",
        ),
        ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    ]:
        r = client.post("/generate_stream", json={"inputs": "x", "parameters": params})
        assert r.status_code == 200
        assert r.text == (
            'data:{"error":"Input validation error: ' + msg.replace('"', '\\"') + '",'
            '"error_type":"validation"}\n\n'
        )


@pytest.mark.parametrize(
    ("content", "headers", "status", "prefix"),
    [
        (b"{not json", {"content-type": "application/json"}, 400, "Failed to parse the request"),
        (b'{"inputs": 3}', {"content-type": "application/json"}, 422, "Failed to deserialize"),
        (b'{"parameters": {}}', {"content-type": "application/json"}, 422, "Failed to deserialize"),
        (
            b'{"inputs":"a","parameters":{"max_new_tokens":1.5}}',
            {"content-type": "application/json"},
            422,
            "Failed to deserialize",
        ),
        (
            b'{"inputs":"a","parameters":{"max_new_tokens":-1}}',
            {"content-type": "application/json"},
            422,
            "Failed to deserialize",
        ),
        (
            b'{"inputs":"a","parameters":{"do_sample":"yes"}}',
            {"content-type": "application/json"},
            422,
            "Failed to deserialize",
        ),
        (b"[1, 2]", {"content-type": "application/json"}, 422, "Failed to deserialize"),
        (b'{"inputs": "a"}', {"content-type": "text/plain"}, 415, "Expected request with"),
        (b'{"inputs": "a"}', {}, 415, "Expected request with"),
    ],
)
def test_body_errors_are_clean_json(client, content, headers, status, prefix):
    for route in ("/generate", "/generate_stream", "/", "/tokenize"):
        r = client.post(route, content=content, headers=headers)
        assert r.status_code == status, (route, r.text)
        body = r.json()
        assert body["error"].startswith(prefix) and body["error_type"] == "validation"
        assert "Traceback" not in r.text


def test_unknown_fields_are_ignored(client):
    r = client.post(
        "/generate", json={"inputs": "a", "foo": 1, "parameters": {"max_new_tokens": 1, "bar": 2}}
    )
    assert r.status_code == 200

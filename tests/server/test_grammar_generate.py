"""`parameters.grammar` over real HTTP: constrained `/generate` and `/generate_stream` on the tiny
model, TGI's validation messages, 422s that name a bad grammar, `--disable-grammar-support`."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import pytest
from fake_engine import FakeEngine
from real_server import real_server
from server_harness import serve

from genserve.cli import build_parser
from genserve.sampling.grammar import GrammarCompiler
from genserve.sampling.grammar_spec import GrammarSpec
from genserve.server.app import build_app
from genserve.server.errors import ValidationError
from genserve.server.settings import ServerSettings
from genserve.server.validation import ValidationLimits, Validator
from genserve.tokenization.tokenizer import Tokenizer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(tiny_llama_dir):
    with real_server(tiny_llama_dir) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
        yield c


def generate(client: httpx.Client, grammar: dict, **params) -> httpx.Response:
    parameters = {"do_sample": True, "seed": 3, "max_new_tokens": 200, "details": True}
    parameters |= params | {"grammar": grammar}
    return client.post("/generate", json={"inputs": "A person:", "parameters": parameters})


@pytest.mark.parametrize(
    "grammar",
    [
        {"type": "json", "value": PERSON},
        {"type": "json_object", "value": json.dumps(PERSON)},  # a string is parsed again
        {"type": "json_schema", "value": {"name": "person", "schema": PERSON, "strict": True}},
    ],
)
def test_generate_json(client, grammar):
    r = generate(client, grammar)
    assert r.status_code == 200, r.text
    body = r.json()
    jsonschema.validate(json.loads(body["generated_text"]), PERSON)
    assert body["details"]["finish_reason"] == "stop_sequence"


def test_generate_regex_greedy(client):
    pattern = r"\d{3}-[a-z]{2,4}"
    r = generate(client, {"type": "regex", "value": pattern}, do_sample=False, seed=None)
    assert r.status_code == 200, r.text
    assert re.fullmatch(pattern, r.json()["generated_text"])


def test_generate_stream_json(client):
    body = {
        "inputs": "JSON:",
        "parameters": {
            "max_new_tokens": 200,
            "details": True,
            "grammar": {"type": "json", "value": PERSON},
        },
    }
    with client.stream("POST", "/generate_stream", json=body) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    final = events[-1]
    assert final["details"]["finish_reason"] == "stop_sequence"
    streamed = "".join(e["token"]["text"] for e in events)
    assert streamed == final["generated_text"]
    jsonschema.validate(json.loads(final["generated_text"]), PERSON)


def _v(message: str) -> dict:
    return {"error": f"Input validation error: {message}", "error_type": "validation"}


TGI_MESSAGES = [
    ({"type": "json", "value": 3}, "grammar is not supported"),
    (
        {"type": "json", "value": {"type": "object"}},
        "grammar is not valid: Grammar must have a 'properties' field",
    ),  # fmt: skip
    (
        {"type": "json", "value": "[1"},
        "grammar is not valid: Expecting ',' delimiter: line 1 column 3 (char 2)",
    ),  # fmt: skip
    (
        {"type": "json", "value": {"type": "strin", "properties": {}}},
        "grammar is not valid: 'strin' is not valid under any of the given schemas",
    ),
    (
        {"type": "json_schema", "value": {"schema": {"properties": {"a": {"minimum": "x"}}}}},
        "grammar is not valid: 'x' is not of type 'number'",
    ),
]


@pytest.mark.parametrize(("grammar", "message"), TGI_MESSAGES)
def test_tgi_validation_messages(client, grammar, message):
    r = generate(client, grammar)
    assert (r.status_code, r.json()) == (422, _v(message))


BAD_RANGE = {"type": "integer", "minimum": 5, "maximum": 1}


@pytest.mark.parametrize(
    ("grammar", "names"),
    [
        ({"type": "regex", "value": "a(b"}, "unclosed group"),
        ({"type": "regex", "value": "[^\\s\\S]"}, "no output can ever satisfy it"),
        (
            {
                "type": "json",
                "value": {"properties": {"a": {"type": "array", "uniqueItems": True}}},
            },
            'Unimplemented keys: ["uniqueItems"]',
        ),
        (
            {
                "type": "json",
                "value": {"type": "object", "properties": {"a": BAD_RANGE}, "required": ["a"]},
            },
            "unsatisfiable",
        ),
    ],
)
def test_bad_grammars_are_422_naming_the_problem(client, grammar, names):
    r = generate(client, grammar)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error.startswith("Input validation error: grammar is not valid: ") and names in error


@pytest.mark.parametrize(
    "grammar",
    [
        {"type": "json_schema", "value": {"name": "no schema"}},
        {"type": "regex", "value": 3},
        {"type": "yaml", "value": "a"},
    ],
)
def test_wrong_grammar_shapes_are_body_errors(client, grammar):
    r = generate(client, grammar)
    assert r.status_code == 422
    assert r.json()["error"].startswith("Failed to deserialize the JSON body into the target type")


def test_stream_errors_are_events(client):
    body = {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "a(b"}}}
    r = client.post("/generate_stream", json=body)
    assert r.status_code == 200 and '"error_type":"validation"' in r.text
    assert "grammar is not valid" in r.text


def test_disable_grammar_support(tiny_llama_dir):
    assert (
        build_parser({}).parse_args(["launch", "--disable-grammar-support"]).disable_grammar_support
    )
    env = {"DISABLE_GRAMMAR_SUPPORT": "true"}
    assert build_parser(env).parse_args(["launch"]).disable_grammar_support
    settings = ServerSettings(
        model_id="fake", max_input_tokens=64, max_total_tokens=128, disable_grammar_support=True
    )
    app = build_app(FakeEngine(), settings, tokenizer=Tokenizer.from_dir(tiny_llama_dir))
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = generate(c, {"type": "json", "value": PERSON}, max_new_tokens=4)
    assert (r.status_code, r.json()) == (422, _v("grammar is not supported"))


def test_compile_grammar_for_chat(tiny_llama_dir):
    """The chat side's entry: a `GrammarSpec` TGI's request form cannot say (any JSON object),
    compiled off the loop; problems are 422s."""
    tokenizer = Tokenizer.from_dir(tiny_llama_dir)
    compiler = GrammarCompiler.for_tokenizer(tokenizer)
    validator = Validator(ValidationLimits(), lambda text, special: [1], grammars=compiler)
    try:
        grammar = asyncio.run(validator.compile_grammar(GrammarSpec.json_object()))
        matcher = grammar.matcher()
        matcher.advance(tokenizer.encode('{"any": [1, {"thing": null}]}', add_special_tokens=False))
        assert matcher.done and matcher.error is None
        with pytest.raises(ValidationError) as err:
            asyncio.run(validator.compile_grammar(GrammarSpec.regex("a(b")))
        assert err.value.status == 422 and "unclosed group" in str(err.value)
    finally:
        validator.close()

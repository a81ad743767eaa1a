"""Chat `response_format` over real HTTP with the `openai` SDK (tiny random Llama, SmolLM2's
tokenizer and template): TGI's and OpenAI's forms, the output validates, bad grammars are 422s."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

HI = [{"role": "user", "content": "Describe a person as JSON."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}


def chat(client: openai.OpenAI, response_format: dict, seed: int = 0, **kw):
    kw = {"max_tokens": 200, "temperature": 1.0, **kw}
    return client.chat.completions.create(
        model="tgi", messages=HI, seed=seed, response_format=response_format, **kw
    )


@pytest.mark.parametrize(
    "form",
    [
        {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
        {"type": "json_schema", "value": {"name": "person", "schema": PERSON}},
        {"type": "json", "value": PERSON},
        {"type": "json_object", "value": json.dumps(PERSON)},
    ],
    ids=["openai", "tgi-json-schema", "tgi-json", "tgi-json-object-string"],
)
def test_json_schema_forms_validate(client, form):
    for seed in (1, 2):
        out = chat(client, form, seed=seed)
        (choice,) = out.choices
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        assert choice.finish_reason == "stop" and choice.message.tool_calls is None


def test_json_schema_stream_assembles_to_valid_json(client):
    form = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    chunks = list(chat(client, form, seed=5, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_json_object_is_any_object(client):
    for seed in (3, 4):
        out = chat(client, {"type": "json_object"}, seed=seed, max_tokens=300)
        (choice,) = out.choices
        if choice.finish_reason == "length":  # a random model may nest deeper than that
            assert choice.message.content.lstrip().startswith("{")
            continue
        assert isinstance(json.loads(choice.message.content), dict)


def test_regex_fullmatches(client):
    pattern = r"(yes|no), [0-9]{2,4}!"
    for seed in (1, 2, 3):
        out = chat(client, {"type": "regex", "value": pattern}, seed=seed)
        assert re.fullmatch(pattern, out.choices[0].message.content)


def test_text_is_unconstrained(client):
    plain = client.chat.completions.create(model="tgi", messages=HI, max_tokens=6, temperature=0)
    text = chat(client, {"type": "text"}, max_tokens=6, temperature=0)
    assert text.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize(
    ("form", "match"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}, "not valid"),
        ({"type": "json", "value": {"type": "object"}}, "must have a 'properties' field"),
        ({"type": "json", "value": "{not json"}, "grammar is not valid"),
        ({"type": "regex", "value": "(unclosed"}, "grammar is not valid"),
        ({"type": "regex", "value": 5}, "response_format"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs a `schema`"),
        ({"type": "yaml"}, "`response_format.type` must be one of"),
        ({"type": "json"}, "needs a `value`"),
    ],
)
def test_bad_grammars_are_422s_naming_the_problem(server, form, match):
    body = {"messages": HI, "max_tokens": 4, "response_format": form}
    r = httpx.post(f"{server[0]}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 422, r.text
    assert match in r.json()["error"] and r.json()["error_type"] == "validation"

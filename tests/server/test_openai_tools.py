"""OpenAI tool calling over real HTTP with the `openai` SDK (tiny random Llama, SmolLM2's
tokenizer and template): calls validate against the tool's parameters, non-stream and stream;
`tool_choice` forms; tool results go back through the template; TGI's errors."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"$ref": "#/$defs/zone"}},
    "required": ["zone"],
    "additionalProperties": False,
    "$defs": {"zone": {"enum": ["UTC", "CET", "PST"]}},
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
PARAMS = {"get_weather": WEATHER, "get_time": TIME}


def call(client: openai.OpenAI, seed: int = 0, **kw):
    kw = {"messages": ASK, "tools": TOOLS, "max_tokens": 200, "temperature": 1.0, **kw}
    return client.chat.completions.create(model="tgi", seed=seed, **kw)


def check_call(tool_call, names=tuple(PARAMS)) -> dict:
    assert tool_call.type == "function" and tool_call.id.startswith("call_")
    assert tool_call.function.name in names
    args = json.loads(tool_call.function.arguments)
    jsonschema.validate(args, PARAMS[tool_call.function.name])
    return args


def test_required_always_calls_a_tool(client):
    ids = set()
    for seed in (1, 2, 3):
        (choice,) = call(client, seed, tool_choice="required").choices
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (tc,) = choice.message.tool_calls
        check_call(tc)
        ids.add(tc.id)
    assert len(ids) == 3


@pytest.mark.parametrize(
    "choice", [{"type": "function", "function": {"name": "get_time"}}, "get_time"]
)
def test_named_choice_always_calls_that_function(client, choice):
    for seed in (1, 2):
        (out,) = call(client, seed, tool_choice=choice).choices
        (tc,) = out.message.tool_calls
        assert tc.function.name == "get_time" and out.finish_reason == "tool_calls"
        check_call(tc)


def test_none_never_calls(client):
    for seed in (1, 2):
        (out,) = call(client, seed, tool_choice="none", max_tokens=8).choices
        assert out.message.tool_calls is None and isinstance(out.message.content, str)
        assert out.finish_reason in ("stop", "length")


def test_auto_answers_in_text_or_calls(client):
    kinds = set()
    for seed in range(4):
        (out,) = call(client, seed, max_tokens=24).choices
        if out.message.tool_calls:
            check_call(out.message.tool_calls[0])
            kinds.add("call")
        else:
            assert isinstance(out.message.content, str) and out.message.content
            assert not out.message.content.lstrip().startswith("{")
            kinds.add("text")
    assert kinds


def test_stream_assembles_tool_calls(client):
    for seed, choice in ((4, "required"), (5, "get_weather")):
        chunks = list(call(client, seed, tool_choice=choice, stream=True))
        first = next(c for c in chunks if c.choices[0].delta.tool_calls)
        (delta,) = first.choices[0].delta.tool_calls
        assert delta.index == 0 and delta.id.startswith("call_") and delta.type == "function"
        assert delta.function.name and delta.function.arguments == ""
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        args = "".join(
            tc.function.arguments or ""
            for c in chunks
            for tc in c.choices[0].delta.tool_calls or []
        )
        jsonschema.validate(json.loads(args), PARAMS[delta.function.name])
        full = call(client, seed, tool_choice=choice)  # the same call, not streamed
        assert full.choices[0].message.tool_calls[0].function.arguments == args


def test_stream_sdk_helper_assembles(client):
    kw = {"messages": ASK, "tools": TOOLS, "max_tokens": 200, "seed": 6, "tool_choice": "required"}
    with client.beta.chat.completions.stream(model="tgi", **kw) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    (tc,) = final.choices[0].message.tool_calls
    check_call(tc)
    assert final.choices[0].finish_reason == "tool_calls"


def test_tool_results_go_back_through_the_template(server, client):
    (first,) = call(client, 1, tool_choice="get_weather").choices
    tc = first.message.tool_calls[0]
    messages = [
        *ASK,
        {"role": "assistant", "tool_calls": [tc.model_dump()]},
        {"role": "tool", "tool_call_id": tc.id, "content": "22 degrees and sunny"},
    ]
    out = client.chat.completions.create(
        model="tgi", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=4
    )
    assert isinstance(out.choices[0].message.content, str)
    tokens = httpx.post(
        f"{server[0]}/chat_tokenize", json={"messages": messages, "max_tokens": 1}
    ).json()
    assert "22 degrees and sunny" in tokens["templated_text"]
    assert tc.function.name in tokens["templated_text"]


def test_tool_prompt_is_injected(server):
    body = {"messages": ASK, "tools": TOOLS, "tool_prompt": "USE A TOOL", "max_tokens": 1}
    text = httpx.post(f"{server[0]}/chat_tokenize", json=body).json()["templated_text"]
    assert "\n---\n" in text and "USE A TOOL" in text and '"get_time"' in text
    default = httpx.post(f"{server[0]}/chat_tokenize", json={**body, "tool_prompt": None})
    assert "Given the functions available" in default.json()["templated_text"]


def test_errors(server):
    url = f"{server[0]}/v1/chat/completions"
    both = {"messages": ASK, "tools": [], "response_format": {"type": "json_object"}}
    r = httpx.post(url, json=both)
    assert r.status_code == 422
    assert r.json() == {
        "error": "Tool error: Grammar and tools are mutually exclusive",
        "error_type": "tool_error",
    }
    r = httpx.post(url, json={"messages": ASK, "tools": TOOLS, "tool_choice": "nope"})
    assert r.status_code == 422
    assert r.json() == {
        "error": "Tool error: Tool with name nope not found",
        "error_type": "tool_error",
    }
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]
    r = httpx.post(url, json={"messages": ASK, "tools": bad, "tool_choice": "required"})
    assert r.status_code == 422 and "tool `f` parameters" in r.json()["error"]


def test_auto_can_call(server, client):
    """A model that starts with `{` under `auto` is held to a valid call (the bias makes it)."""
    (brace,) = httpx.post(f"{server[0]}/tokenize", json={"inputs": "{"}).json()
    for seed, stream in ((1, False), (2, True)):
        kw = {"logit_bias": {str(brace["id"]): 100}, "tool_choice": "auto"}
        out = call(client, seed, stream=stream, **kw)
        if stream:
            chunks = list(out)
            assert chunks[-1].choices[0].finish_reason == "tool_calls"
            (tc,) = [t for c in chunks for t in c.choices[0].delta.tool_calls or [] if t.id]
            args = "".join(
                t.function.arguments or ""
                for c in chunks
                for t in c.choices[0].delta.tool_calls or []
            )
            jsonschema.validate(json.loads(args), PARAMS[tc.function.name])
        else:
            (choice,) = out.choices
            assert choice.finish_reason == "tool_calls"
            check_call(choice.message.tool_calls[0])

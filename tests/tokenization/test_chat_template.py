"""Chat templates: rendering equals transformers' `apply_chat_template` on real templates;
TGI's source order and rewrites; continue-final-message; the sandbox."""

from __future__ import annotations

import json

import pytest

from genserve.server.openai_request import template_messages
from genserve.server.protocol_openai import ChatMessage
from genserve.tokenization.chat_template import (
    ChatTemplate,
    NoTemplateError,
    TemplateError,
    find_template_source,
)
from genserve.tokenization.tokenizer import Tokenizer

WEATHER_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
}

CONVERSATIONS = {
    "single user": [{"role": "user", "content": "Hi"}],
    "system": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "multi-turn": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    "system multi-turn": [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Arr!"},
        {"role": "user", "content": "Where is the treasure?"},
    ],
    "tool messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"},
    ],
    "tool then user": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": "Thanks"},
    ],
    "continue final message": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is"},
    ],
    "whitespace": [{"role": "user", "content": "  spaced \n text  "}],
    "jinja-looking unicode": [
        {"role": "user", "content": '{{ 7*7 }} {% raw %} <b>é</b> 你好 "quotes"'}
    ],
    "reasoning history": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<think>\nhm\n</think>\n\nb"},
        {"role": "user", "content": "c"},
    ],
}


@pytest.fixture(scope="module", params=["smollm2", "qwen3", "llama3"])
def templates(request) -> tuple[object, ChatTemplate]:
    """(transformers' tokenizer, our template) for one real tokenizer directory."""
    from transformers import AutoTokenizer

    path = request.getfixturevalue(f"{request.param}_tokenizer_dir")
    ours = ChatTemplate.from_tokenizer(Tokenizer.from_dir(path))
    return AutoTokenizer.from_pretrained(path), ours


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_render_equals_transformers(templates, name):
    hf, ours = templates
    messages = CONVERSATIONS[name]
    cont = messages[-1]["role"] == "assistant"
    expected = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=not cont, continue_final_message=cont
    )
    assert ours.apply(messages) == expected


def test_source_order(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("jinja")
    assert find_template_source(tmp_path)[0] == "jinja"
    (tmp_path / "processor_config.json").write_text(json.dumps({"chat_template": "processor"}))
    assert find_template_source(tmp_path)[0] == "processor"
    config = {"chat_template": "config", "bos_token": {"content": "<s>"}, "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert find_template_source(tmp_path)[0] == "config"
    override = tmp_path / "override.json"
    override.write_text(json.dumps({"chat_template": "override"}))
    assert find_template_source(tmp_path, override)[0] == "override"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "first"}))
    assert find_template_source(tmp_path, override)[0] == "first"
    tpl = ChatTemplate.load(tmp_path)
    assert (tpl.source, tpl.bos_token, tpl.eos_token) == ("first", "<s>", "</s>")


def test_named_templates_use_default(tmp_path):
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "dflt"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert ChatTemplate.load(tmp_path).source == "dflt"


def test_no_template(tmp_path):
    with pytest.raises(NoTemplateError, match="no chat template"):
        ChatTemplate.load(tmp_path)


def test_tgi_rewrites_and_helpers():
    source = (
        "{% generation %}{{ messages[0]['content'][0]['text'] }}{% endgeneration %}"
        "{%- for m in messages[::-1] %}|{{ m.content }}{% endfor %}"
        "{{ {'a': '<&>'} | tojson }}{{ strftime_now('%Y')|length }}"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.first %}{% continue %}"
        "{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}{{ bos_token }}"
    )
    tpl = ChatTemplate(source, bos_token="<s>")
    out = tpl.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert out == 'a|b|a{"a": "<&>"}41<s>'


def test_raise_exception_and_errors():
    tpl = ChatTemplate("{{ raise_exception('Roles must alternate') }}")
    with pytest.raises(TemplateError, match="Roles must alternate"):
        tpl.render([])
    with pytest.raises(TemplateError, match="syntax error"):
        ChatTemplate("{% for %}")
    with pytest.raises(TemplateError, match="UndefinedError"):
        ChatTemplate("{{ messages[0].content + 1 }}").render([{"role": "user"}])


ATTACKS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages.__class__ }}",
    "{{ (messages|first).__class__.__base__ }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ self.__init__.__globals__ }}",
    "{% set ns = namespace(__class__=1) %}",
    "{% set x = messages.append(1) %}",
    "{{ 'a'.upper.__self__ }}",
    "{{ messages['__class__'] }}",
]


@pytest.mark.parametrize("source", ATTACKS)
def test_sandbox_refuses_python_internals(source):
    tpl = ChatTemplate(source)
    with pytest.raises(TemplateError):
        tpl.render([{"role": "user", "content": "hi"}])


def test_message_content_is_never_evaluated(smollm2_tokenizer_dir):
    tpl = ChatTemplate.from_tokenizer(Tokenizer.from_dir(smollm2_tokenizer_dir))
    evil = "{{ cycler.__init__.__globals__ }}{% raw %}"
    assert evil in tpl.apply([{"role": "user", "content": evil}])


def test_tool_calls_reach_templates_that_render_them(qwen3_tokenizer_dir, smollm2_tokenizer_dir):
    msg = ChatMessage.model_validate(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "f", "arguments": '{"x": 1}'}},
            ],
        }
    )  # fmt: skip
    qwen = ChatTemplate.from_tokenizer(Tokenizer.from_dir(qwen3_tokenizer_dir))
    (item,) = template_messages([msg], qwen)
    assert item["content"] == "" and item["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    smol = ChatTemplate.from_tokenizer(Tokenizer.from_dir(smollm2_tokenizer_dir))
    (item,) = template_messages([msg], smol)  # TGI: the calls as JSON content
    assert "tool_calls" not in item
    assert json.loads(item["content"])[0]["function"]["name"] == "f"

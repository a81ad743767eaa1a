"""Chat templates in the server: `--tokenizer-config-path`, the sandbox (an attempt to reach
Python internals is a 422 `template_error` and the server keeps serving), no template at all."""

from __future__ import annotations

import json

import httpx
import pytest
from real_server import real_server

from genserve.server.errors import TemplateError
from genserve.server.openai_request import render_chat
from genserve.server.protocol_openai import ChatMessage
from genserve.tokenization.chat_template import NoTemplateError

# A template that misbehaves on request: the message content picks the attack.
EVIL = (
    "{%- for m in messages -%}"
    "{%- if m.content == 'class' -%}{{ m.content.__class__ }}"
    "{%- elif m.content == 'globals' -%}{{ cycler.__init__.__globals__ }}"
    "{%- elif m.content == 'subclasses' -%}{{ ''.__class__.__mro__[1].__subclasses__() }}"
    "{%- elif m.content == 'mutate' -%}{{ messages.append(m) }}"
    "{%- elif m.content == 'raise' -%}{{ raise_exception('Conversation roles must alternate') }}"
    "{%- else -%}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    config = tmp_path_factory.mktemp("tokenizer-config") / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": EVIL, "eos_token": "<|im_end|>"}))
    with real_server(tiny_llama_dir, tokenizer_config_path=str(config)) as (url, engine):
        yield url


def chat(url: str, content: str, route: str = "/v1/chat/completions") -> httpx.Response:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2}
    return httpx.post(f"{url}{route}", json=body, timeout=60)


def test_tokenizer_config_path_replaces_the_models_template(server):
    body = chat(server, "hello", "/chat_tokenize").json()
    # (the `-` whitespace controls of EVIL eat the newlines after the tags)
    assert body["templated_text"] == "<|im_start|>user\nhello<|im_end|><|im_start|>assistant"


@pytest.mark.parametrize("attack", ["class", "globals", "subclasses", "mutate"])
def test_reaching_python_internals_is_refused(server, attack):
    for route in ("/v1/chat/completions", "/chat_tokenize"):
        r = chat(server, attack, route)
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["error_type"] == "template_error"
        assert body["error"].startswith("Template error: ")
    stream = {"messages": [{"role": "user", "content": attack}], "stream": True}
    r = httpx.post(f"{server}/v1/chat/completions", json=stream, timeout=60)
    assert r.status_code == 422 and r.json()["error_type"] == "template_error"
    assert chat(server, "still serving").status_code == 200


def test_raise_exception_message_and_metrics(server):
    r = chat(server, "raise")
    assert r.status_code == 422
    assert r.json() == {
        "error": "Template error: Conversation roles must alternate",
        "error_type": "template_error",
    }
    metrics = httpx.get(f"{server}/metrics").text
    assert 'tgi_request_failure{err="template"}' in metrics


def test_message_content_is_data(server):
    evil = "{{ cycler.__init__.__globals__ }}{% for x in range(9) %}x{% endfor %}"
    body = chat(server, evil, "/chat_tokenize").json()
    assert evil in body["templated_text"]
    r = httpx.post(f"{server}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200


def test_no_template_is_a_clear_422():
    messages = [ChatMessage(role="user", content="Hi")]
    with pytest.raises(TemplateError) as info:
        render_chat(NoTemplateError(), messages)
    err = info.value
    assert err.status == 422 and err.error_type == "template_error"
    assert "no chat template" in err.message and "/v1/completions" in err.message

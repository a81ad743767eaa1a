"""Chat templates rendered as transformers does, in jinja2's immutable sandbox.

Sources in TGI's order: `chat_template.json`, then `tokenizer_config.json` (or
`--tokenizer-config-path`), then `chat_template.jinja`, then GGUF metadata (already written to
tokenizer_config.json by the converter). A template may be a string or a list of
`{name, template}` entries, of which `default` is used.
"""

from __future__ import annotations

import datetime
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from genserve.tokenization.tokenizer import Tokenizer


class TemplateError(ValueError):
    """A template that fails to compile or render (TGI: 422 `template_error`)."""


class NoTemplateError(TemplateError):
    pass


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:  # fmt: skip
    # transformers' tojson: no HTML escaping (jinja's built-in escapes <, >, &, ')
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)  # fmt: skip


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TemplateError(str(e)) from e


def select_template(raw: str | list[dict[str, Any]] | None, name: str = "default") -> str | None:
    if raw is None or isinstance(raw, str):
        return raw
    by_name = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}
    return by_name.get(name)


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class ChatTemplate:
    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None):
        self.source = source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self.template = _compile(source)
        # TGI passes tools only to templates that mention them
        self.uses_tools = "tools" in source

    @classmethod
    def from_sources(
        cls, model_dir: Path | None, tokenizer: Tokenizer, tokenizer_config_path: Path | None = None
    ) -> ChatTemplate:
        raw: Any = None
        if model_dir is not None and (model_dir / "chat_template.json").is_file():
            raw = json.loads((model_dir / "chat_template.json").read_text()).get("chat_template")
        if raw is None and tokenizer_config_path is not None:
            raw = json.loads(Path(tokenizer_config_path).read_text()).get("chat_template")
        if raw is None:
            raw = tokenizer.chat_template
        source = select_template(raw)
        if not source:
            raise NoTemplateError("This model has no chat template")
        return cls(source, tokenizer.bos_token, tokenizer.eos_token)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> ChatTemplate:
        return cls.from_sources(None, tokenizer)

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        try:
            return self.template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=tools,
                **extra,
            )
        except TemplateError:
            raise
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(f"unsafe template operation: {e}") from e
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise TemplateError(str(e)) from e

"""Chat templates: found where TGI looks, rendered as transformers renders them, in a sandbox.

Sources, first found wins (TGI's `router/src/server.rs`): `chat_template.json`, then
`tokenizer_config.json` (or the file given with `--tokenizer-config-path`, which replaces it),
then `processor_config.json`, then `chat_template.jinja` (where the GGUF converter also writes the
template from GGUF metadata). A template is a string or a list of `{name, template}` entries, of
which `default` is used.

Rendering uses jinja2's `ImmutableSandboxedEnvironment` set up as transformers sets it up
(`trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, a `tojson`
that does not HTML-escape, a `namespace` that refuses underscore names), so prompts equal
`apply_chat_template`'s. Templates cannot reach Python internals: the sandbox refuses
`__class__`, `__globals__`, ... with a `SecurityError` (where jinja would render them as nothing),
reported as a TemplateError; message contents are data, never evaluated.

TGI's source rewrites, for what jinja2 needs of them: `{% generation %}` / `{% endgeneration %}`
are removed, and gemma3's `messages[0]['content'][0]['text']` becomes `messages[0]['content']`
(contents reach the template as strings). TGI's `[::-1]` -> `|reverse` rewrite exists because
minijinja lacks negative slices; jinja2 has them, so the source is kept.
"""

from __future__ import annotations

import datetime
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.utils
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

NO_TEMPLATE = (
    "template not found: this model has no chat template (looked in chat_template.json, "
    "tokenizer_config.json, processor_config.json and chat_template.jinja); use /v1/completions "
    "or /generate, or give one with --tokenizer-config-path"
)

_GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")
_GEMMA3 = "messages[0]['content'][0]['text']"


class TemplateError(ValueError):
    """A template that fails to compile or render (TGI: 422 `template_error`)."""


class NoTemplateError(TemplateError):
    def __init__(self, message: str = NO_TEMPLATE) -> None:
        super().__init__(message)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:  # fmt: skip
    # transformers' tojson: no HTML escaping (jinja's built-in escapes <, >, &, ')
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)  # fmt: skip


class _TemplateDict:
    """`dict(...)` for templates, without exposing the `dict` type itself (as transformers)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace, refusing underscore-prefixed attribute names (as transformers)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"templates cannot store underscore-prefixed names on a namespace: {name!r}"
            )


def rewrite_source(source: str) -> str:
    """TGI's rewrites that jinja2 needs (see the module docstring)."""
    return _GENERATION_TAG.sub("", source.replace(_GEMMA3, "messages[0]['content']"))


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja's sandbox makes an unsafe attribute (`__class__`, `__globals__`, ...) an undefined
    value that renders as nothing; here it is refused at once, so an attempt is a 422."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(rewrite_source(source))
    except jinja2.TemplateError as e:
        raise TemplateError(f"syntax error: {e}") from e


def select_template(raw: Any, name: str = "default") -> str | None:
    """A template string, or the entry named `name` of a `[{name, template}]` list."""
    if raw is None or isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        by_name = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}
        found = by_name.get(name)
        return found if isinstance(found, str) else None
    return None


def _token_str(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def find_template_source(
    model_dir: Path | None, tokenizer_config_path: Path | None = None
) -> tuple[Any, dict[str, Any]]:
    """(raw template or None, the tokenizer config used), in TGI's source order."""
    config_path = tokenizer_config_path
    if config_path is None and model_dir is not None:
        config_path = model_dir / "tokenizer_config.json"
    config = _read_json(Path(config_path)) if config_path is not None else {}
    candidates: list[Any] = []
    if model_dir is not None:
        candidates.append(_read_json(model_dir / "chat_template.json").get("chat_template"))
    candidates.append(config.get("chat_template"))
    if model_dir is not None:
        candidates.append(_read_json(model_dir / "processor_config.json").get("chat_template"))
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():
            candidates.append(jinja_file.read_text(encoding="utf-8"))
    raw = next((c for c in candidates if c is not None), None)
    return raw, config


class ChatTemplate:
    """One compiled template plus the special tokens it is rendered with."""

    def __init__(
        self, source: str, bos_token: str | None = None, eos_token: str | None = None
    ) -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.template = compile_template(source)
        # whether the template renders structured `tool_calls` itself (else TGI's JSON content)
        self.uses_tool_calls = "tool_calls" in source
        # TGI passes `tools` to templates that mention them, else appends them to the prompt
        self.uses_tools = "tools" in source

    @classmethod
    def load(
        cls,
        model_dir: Path | None,
        tokenizer: Any = None,
        tokenizer_config_path: Path | None = None,
    ) -> ChatTemplate:
        """Raises NoTemplateError when no source has one, TemplateError when it does not
        compile. Without a model directory, the tokenizer's own template is the source."""
        raw, config = find_template_source(model_dir, tokenizer_config_path)
        if raw is None and tokenizer is not None:
            raw = getattr(tokenizer, "chat_template", None)
        source = select_template(raw)
        if not source:
            raise NoTemplateError()
        bos = _token_str(config.get("bos_token")) or getattr(tokenizer, "bos_token", None)
        eos = _token_str(config.get("eos_token")) or getattr(tokenizer, "eos_token", None)
        return cls(source, bos, eos)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ChatTemplate:
        return cls.load(getattr(tokenizer, "source_dir", None), tokenizer)

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        context: dict[str, Any] = {}
        if self.bos_token is not None:
            context["bos_token"] = self.bos_token
        if self.eos_token is not None:
            context["eos_token"] = self.eos_token
        context.update(extra)
        try:
            return self.template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                **context,
            )
        except TemplateError:
            raise
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(f"unsafe template operation: {e}") from e
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError,
                IndexError, ZeroDivisionError, OverflowError, RecursionError) as e:  # fmt: skip
            raise TemplateError(f"{type(e).__name__}: {e}") from e

    def apply(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        """TGI's `ChatTemplate::apply`: always with the generation prompt; a final assistant
        message is continued: the text is cut right after the last occurrence of its content,
        then right-trimmed (transformers' pipeline `continue_final_message`)."""
        rendered = self.render(messages, add_generation_prompt=True, tools=tools)
        last = messages[-1] if messages else None
        if last is None or last.get("role") != "assistant":
            return rendered
        content = last.get("content")
        if not isinstance(content, str):
            return rendered
        at = rendered.rfind(content)
        if at < 0:
            return rendered
        return rendered[: at + len(content)].rstrip()

"""OpenAI request -> TGI's GenerateRequest -> one ValidRequest per choice.

The OpenAI bodies become TGI's `GenerateRequest` first (TGI's `try_into_generate`), so every
check and message of `validation.py` applies unchanged; what TGI's parameters cannot say
(OpenAI's presence/frequency penalties, `logit_bias`, `n`) is validated here and set on the
engine's `SamplingParams` afterwards. Constrained decoding plugs in at `grammar_for`: it turns
`response_format` / `tools` into the grammar for `GenerateParameters.grammar` (TGI's
`GrammarType`, with TGI's checks, or a `GrammarSpec` for what TGI's form cannot say) and the
`ToolPlan` that the prompt and the response are built from.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from typing import Any

import jsonschema
from pydantic import ValidationError as PydanticValidationError

from genserve.sampling.grammar import JSON_OPTIONS
from genserve.sampling.grammar_spec import GrammarSpec
from genserve.server.errors import TemplateError, ToolError, ValidationError
from genserve.server.generation import GenerationService, Timing
from genserve.server.protocol import GenerateParameters, GenerateRequest, GrammarType
from genserve.server.protocol_openai import ChatMessage, ChatRequest, _Sampling
from genserve.server.validation import ValidRequest
from genserve.tokenization import chat_template as ct

_U64 = 2**64


@dataclass(slots=True)
class Extras:
    """What the OpenAI request asks beyond TGI's parameters."""

    n: int
    presence_penalty: float
    logit_bias: dict[int, float]
    stop: list[str]


# TGI's default `tool_prompt` (`router/src/lib.rs`), word for word
TOOL_PROMPT = (
    "\nGiven the functions available, please respond with a JSON for a function call with its "
    "proper arguments that best answers the given prompt. Respond in the format {name: function "
    "name, parameters: dictionary of argument name and its value}.Do not use variables.\n"
)
ANY_OBJECT = {"type": "object"}
# a text answer of `tool_choice: auto`: anything that does not start like a JSON value
_TEXT_RULE = r"TEXT: /[^{\[ \t\r\n](.|\n)*/"


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What `tools` + `tool_choice` ask: the tools shown to the model (OpenAI's shape), the
    names it may call, whether it may answer in text instead (`auto`), the prompt text."""

    tools: list[dict[str, Any]]
    names: tuple[str, ...]
    auto: bool
    prompt: str


Grammar = GrammarType | GrammarSpec


def grammar_for(req: ChatRequest) -> tuple[Grammar | None, ToolPlan | None]:
    """The grammar that constrains this chat request, if any, and its tool plan (see
    docs/openai.md, "Structured output and tools")."""
    if req.response_format is not None and req.tools is not None:
        raise ToolError("Grammar and tools are mutually exclusive")
    if req.response_format is not None:
        return response_format_grammar(req.response_format), None
    return tool_grammar(req)


def _grammar_type(kind: str, value: Any) -> GrammarType:
    try:
        return GrammarType(type=kind, value=value)
    except PydanticValidationError as exc:
        reason = "; ".join(e["msg"] for e in exc.errors())
        raise ValidationError(f"`response_format` is not valid: {reason}") from None


def response_format_grammar(rf: Any) -> Grammar | None:
    """TGI's form (`{"type": "json"|"json_object"|"json_schema"|"regex", "value": ...}`, TGI's
    checks) and OpenAI's (`{"type": "json_schema", "json_schema": {"name", "schema",
    "strict"}}`, `{"type": "json_object"}` = any JSON object, `{"type": "text"}` = none)."""
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object" and rf.get("value") is None:
        return GrammarSpec.json_object()
    if kind == "json_schema" and "json_schema" in rf:
        spec = rf["json_schema"]
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValidationError("`response_format.json_schema` needs a `schema` object")
        return _grammar_type("json_schema", spec)
    if kind in ("json", "json_object", "json_schema", "regex"):
        if "value" not in rf:
            raise ValidationError(f"`response_format` of type `{kind}` needs a `value`")
        return _grammar_type(kind, rf["value"])
    raise ValidationError(
        "`response_format.type` must be one of `text`, `json_object`, `json_schema`, `json`, "
        f"`regex`. Given: {kind!r}"
    )


def _tool(raw: Any, index: int) -> dict[str, Any]:
    """`{"type": "function", "function": {"name", "description"?, "parameters"?}}`
    (TGI's alias `arguments` for `parameters` is read too)."""
    fn = raw.get("function") if isinstance(raw, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValidationError(f"tools[{index}]: needs `function` with a `name`")
    if raw.get("type", "function") != "function":
        raise ValidationError(f"tools[{index}]: `type` must be `function`")
    params = fn.get("parameters", fn.get("arguments"))
    params = ANY_OBJECT if params is None else params
    if not isinstance(params, dict):
        raise ValidationError(f"tools[{index}]: `parameters` must be a JSON schema object")
    try:
        jsonschema.Draft202012Validator.check_schema(params)
    except jsonschema.SchemaError as exc:
        raise ValidationError(
            f"grammar is not valid: tool `{fn['name']}` parameters: {exc.message}"
        ) from None
    out = {"name": fn["name"], "parameters": params}
    if fn.get("description") is not None:
        out = {"name": fn["name"], "description": fn["description"], "parameters": params}
    return {"type": "function", "function": out}


def _choice(tool_choice: Any) -> str | tuple[str]:
    """ "auto" | "none" | "required", or (name,): TGI's forms; any other string is a name."""
    if tool_choice is None:
        return "auto"
    if isinstance(tool_choice, str):
        return tool_choice if tool_choice in ("auto", "none", "required") else (tool_choice,)
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return (fn["name"],)
    raise ValidationError(
        "`tool_choice` must be `auto`, `none`, `required`, a function name or "
        '`{"type": "function", "function": {"name": ...}}`'
    )


def tool_grammar(req: ChatRequest) -> tuple[Grammar | None, ToolPlan | None]:
    """The model's tool call is `{"name": <a tool's name>, "arguments": <its parameters>}`,
    one `anyOf` branch per tool; with `auto` it may answer in free text instead (a Lark
    grammar: text that does not start like JSON, or the tool call)."""
    choice = _choice(req.tool_choice)
    if choice == "none" or (not req.tools and choice == "auto"):
        return None, None
    if not req.tools:
        raise ToolError("`tool_choice` needs `tools`")
    tools = [_tool(t, i) for i, t in enumerate(req.tools)]
    if isinstance(choice, tuple):
        (name,) = choice
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise ToolError(f"Tool with name {name} not found")
    else:
        chosen = tools
    schema = tool_call_schema([t["function"] for t in chosen])
    names = tuple(t["function"]["name"] for t in chosen)
    prompt = TOOL_PROMPT if req.tool_prompt is None else req.tool_prompt
    plan = ToolPlan(tools, names, choice == "auto", prompt)
    if not plan.auto:
        return GrammarSpec.json_schema(schema), plan
    schema = {"x-guidance": JSON_OPTIONS, **schema}
    lark = f"start: TEXT | call\n{_TEXT_RULE}\ncall: %json {json.dumps(schema)}\n"
    return GrammarSpec.lark(lark), plan


def tool_call_schema(functions: list[dict[str, Any]]) -> dict[str, Any]:
    """anyOf `{"name": const, "arguments": parameters}`; each tool's `$defs` are lifted to the
    root, where its `#/$defs/...` references point."""
    defs: dict[str, Any] = {}
    branches = []
    for fn in functions:
        params = dict(fn["parameters"])
        defs.update(params.pop("$defs", None) or {})
        branches.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {"anyOf": branches} if len(branches) > 1 else branches[0]
    return {**schema, "$defs": defs} if defs else schema


def generate_parameters(
    req: _Sampling,
    max_new_tokens: int | None,
    top_n_tokens: int | None,
    decoder_input_details: bool = False,
    grammar: Grammar | None = None,
    repetition_penalty: float | None = None,
) -> GenerateParameters:
    """TGI's mapping: `temperature == 0` is greedy, anything else samples (temperature 1 by
    default). OpenAI's `top_p` range is (0, 1]: 1.0 is the identity (TGI refuses it) and 0
    keeps only the best token, i.e. greedy; greedy ignores `top_p`."""
    greedy = req.temperature == 0.0 or req.top_p == 0.0
    top_p = None if greedy or req.top_p == 1.0 else req.top_p
    params = GenerateParameters(
        do_sample=not greedy,
        temperature=None if greedy else req.temperature,
        top_p=top_p,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=repetition_penalty,
        max_new_tokens=max_new_tokens,
        seed=req.seed,
        stop=list(req.stop or []),
        top_n_tokens=top_n_tokens,
        details=True,
        decoder_input_details=decoder_input_details,
        grammar=grammar if isinstance(grammar, GrammarType) else None,
    )
    if isinstance(grammar, GrammarSpec):  # chat-only grammars (any object, tools): compiled as is
        params.grammar = grammar
    return params


def extras_of(req: _Sampling, vocab_size: int) -> Extras:
    n = 1 if req.n is None else req.n
    if n < 1:
        raise ValidationError(f"`n` must be strictly positive. Given: {n}")
    if req.top_p is not None and not 0.0 <= req.top_p <= 1.0:
        raise ValidationError("`top_p` must be >= 0.0 and <= 1.0")
    presence = 0.0 if req.presence_penalty is None else req.presence_penalty
    if not -2.0 <= presence <= 2.0:
        raise ValidationError("`presence_penalty` must be >= -2.0 and <= 2.0")
    return Extras(n, presence, _logit_bias(req.logit_bias or {}, vocab_size), list(req.stop or []))


def _logit_bias(raw: dict[str, float], vocab_size: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, bias in raw.items():
        try:
            token = int(key)
        except ValueError:
            raise ValidationError(f"`logit_bias` keys must be token ids. Given: {key!r}") from None
        if not 0 <= token < vocab_size:
            raise ValidationError(
                f"`logit_bias` token ids must be >= 0 and < {vocab_size}. Given: {token}"
            )
        if not -100.0 <= bias <= 100.0:
            raise ValidationError(f"`logit_bias` values must be >= -100 and <= 100. Given: {bias}")
        out[token] = float(bias)
    return out


# ------------------------------------------------------------------------------ messages


def _content_text(msg: ChatMessage, index: int) -> str | None:
    """String content, or text parts joined (TGI); images are refused on text-only models."""
    if msg.content is None or isinstance(msg.content, str):
        return msg.content
    texts = []
    for part in msg.content:
        if part.type == "text":
            if part.text is None:
                raise ValidationError(f"messages[{index}]: a `text` part needs `text`")
            texts.append(part.text)
        elif part.type == "image_url":
            raise ValidationError(
                f"messages[{index}]: image content is not supported: this model is text-only"
            )
        else:
            raise ValidationError(
                f"messages[{index}]: unsupported content part type {part.type!r} (expected `text`)"
            )
    return "".join(texts)


def _tool_call(call: Any) -> dict[str, Any]:
    """As templates expect it: `arguments` as an object when it is a JSON object string (so
    templates that `tojson` it do not double-encode; transformers' convention)."""
    args = call.function.arguments
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except ValueError:
            parsed = None
        args = parsed if isinstance(parsed, dict) else args
    function = {"name": call.function.name, "arguments": args}
    out: dict[str, Any] = {"type": call.type, "function": function}
    if call.id is not None:
        out = {"id": call.id, **out}
    return out


def template_messages(messages: list[ChatMessage], template: ct.ChatTemplate) -> list[dict]:
    """The dicts the template sees: role, content (a string), and name / tool_calls /
    tool_call_id when set. A template that does not render `tool_calls` gets TGI's
    rendering instead: the calls as JSON in `content`."""
    out = []
    for i, msg in enumerate(messages):
        content = _content_text(msg, i)
        if content is None and not msg.tool_calls:
            raise ValidationError(f"messages[{i}]: `content` or `tool_calls` is required")
        item: dict[str, Any] = {"role": msg.role, "content": content or ""}
        if msg.name is not None:
            item["name"] = msg.name
        if msg.tool_calls:
            calls = [_tool_call(c) for c in msg.tool_calls]
            if template.uses_tool_calls:
                item["tool_calls"] = calls
            elif not content:
                item["content"] = json.dumps(calls, ensure_ascii=False, separators=(",", ":"))
        if msg.tool_call_id is not None:
            item["tool_call_id"] = msg.tool_call_id
        out.append(item)
    return out


def render_chat(
    template: ct.ChatTemplate | Exception,
    messages: list[ChatMessage],
    plan: ToolPlan | None = None,
) -> str:
    """The prompt text; a missing or failing template is TGI's 422 `template_error`. Tools
    are injected as TGI does: a template that mentions `tools` gets them and the last message
    gets `"\n---\n" + tool_prompt`; otherwise the last message gets the tools as JSON too."""
    if isinstance(template, Exception):
        raise TemplateError(str(template))
    dicts = template_messages(messages, template)
    tools = None
    if plan is not None and dicts:
        if template.uses_tools:
            tools, extra = plan.tools, f"\n---\n{plan.prompt}"
        else:
            extra = f"\n---\n{json.dumps(plan.tools, ensure_ascii=False)}\n{plan.prompt}"
        dicts[-1]["content"] += extra
    try:
        return template.apply(dicts, tools=tools)
    except ct.TemplateError as e:
        raise TemplateError(str(e)) from None


# ------------------------------------------------------------------------------ choices


async def validate(
    service: GenerationService, req: GenerateRequest, add_special_tokens: bool, arrival: float
) -> tuple[ValidRequest, Timing]:
    timing = Timing(arrival=arrival)
    valid = await service.validate(req, timing, add_special_tokens=add_special_tokens)
    return valid, timing


def choices_of(valid: ValidRequest, extras: Extras, seeded: bool) -> list[ValidRequest]:
    """n independent requests: OpenAI's penalties and bias on each; with a seed, choice i uses
    seed + i (so choice 0 equals the n=1 answer), else each gets its own random seed."""
    out = []
    for i in range(extras.n):
        sampling = replace(
            valid.sampling,
            presence_penalty=extras.presence_penalty,
            openai_penalties=True,
            logit_bias=dict(extras.logit_bias),
        )
        if i > 0:
            seed = (valid.sampling.seed + i) % _U64 if seeded else random.getrandbits(64)
            sampling.seed = seed
        out.append(replace(valid, sampling=sampling))
    return out

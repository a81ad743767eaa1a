"""OpenAI request -> TGI's GenerateRequest -> one ValidRequest per choice.

The OpenAI bodies become TGI's `GenerateRequest` first (TGI's `try_into_generate`), so every
check and message of `validation.py` applies unchanged; what TGI's parameters cannot say
(OpenAI's presence/frequency penalties, `logit_bias`, `n`) is validated here and set on the
engine's `SamplingParams` afterwards. Constrained decoding plugs in at `grammar_for`: it returns
the `GrammarType` for `GenerateParameters.grammar` (today: none; `response_format` and `tools`
are refused with a 422 until the structured-output work lands).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from typing import Any

from genserve.server.errors import TemplateError, ValidationError
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


def grammar_for(req: ChatRequest) -> GrammarType | None:
    """The grammar that constrains this chat request, if any (structured-output hook)."""
    if req.response_format is not None:
        raise ValidationError("`response_format` is not supported yet by this server")
    if req.tools is not None:
        raise ValidationError("`tools` are not supported yet by this server")
    if req.tool_choice not in (None, "none", "auto"):
        raise ValidationError("`tool_choice` needs `tools`, which are not supported yet")
    return None


def generate_parameters(
    req: _Sampling,
    max_new_tokens: int | None,
    top_n_tokens: int | None,
    decoder_input_details: bool = False,
    grammar: GrammarType | None = None,
    repetition_penalty: float | None = None,
) -> GenerateParameters:
    """TGI's mapping: `temperature == 0` is greedy, anything else samples (temperature 1 by
    default). OpenAI's `top_p` range is (0, 1]: 1.0 is the identity (TGI refuses it) and 0
    keeps only the best token, i.e. greedy; greedy ignores `top_p`."""
    greedy = req.temperature == 0.0 or req.top_p == 0.0
    top_p = None if greedy or req.top_p == 1.0 else req.top_p
    return GenerateParameters(
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
        grammar=grammar,
    )


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
    template: ct.ChatTemplate | Exception, messages: list[ChatMessage], tools: Any = None
) -> str:
    """The prompt text; a missing or failing template is TGI's 422 `template_error`."""
    if isinstance(template, Exception):
        raise TemplateError(str(template))
    dicts = template_messages(messages, template)
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

"""`/v1/chat/completions` bodies: the `chat.completion` JSON and the `chat.completion.chunk`
stream (TGI's shapes, OpenAI's `finish_reason` vocabulary, stop sequences left out), and tool
calls: the constrained output `{"name": ..., "arguments": {...}}` becomes OpenAI's
`message.tool_calls` (streamed: the name first, then fragments of the arguments text)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from genserve.server.errors import InferError
from genserve.server.generation import GenerationService
from genserve.server.openai_request import ToolPlan
from genserve.server.openai_run import (
    DONE,
    Choice,
    error_event,
    interleaved,
    sse,
    trim_stop,
)
from genserve.server.protocol import Token
from genserve.server.protocol_openai import (
    ResponseMeta,
    openai_finish_reason,
    openai_logprob,
    usage,
)
from genserve.server.streaming import KEEP_ALIVE, with_keepalive


def logprob_entry(token: Token, top: list[Token] | None) -> dict[str, Any]:
    return {
        "token": token.text,
        "logprob": openai_logprob(token.logprob),
        "top_logprobs": [
            {"token": t.text, "logprob": openai_logprob(t.logprob)} for t in (top or [])
        ],
    }


def _logprobs(choice: Choice, want: bool) -> dict[str, Any] | None:
    if not want:
        return None
    r = choice.result
    tops = r.top_tokens or [None] * len(r.tokens)
    return {"content": [logprob_entry(t, top) for t, top in zip(r.tokens, tops, strict=False)]}


def response_usage(choices: list[Choice]) -> dict[str, Any]:
    """Prompt tokens once per prompt; completion tokens of every choice; cached tokens are the
    least any choice of a prompt got from the prefix cache."""
    prompts: dict[int, tuple[int, int]] = {}
    for c in choices:
        seen = prompts.get(c.prompt_index)
        cached = c.cached_tokens if seen is None else min(seen[1], c.cached_tokens)
        prompts[c.prompt_index] = (c.valid.input_length, cached)
    completion = sum(len(c.result.tokens) for c in choices)
    return usage(
        sum(p for p, _ in prompts.values()), completion, sum(c for _, c in prompts.values())
    )


# the start of a tool call, up to the arguments' value (the grammar allows one space between tokens)
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def call_head(text: str) -> tuple[str, int] | None:
    """(function name, where the arguments start) once the text has got that far."""
    m = _CALL_HEAD.match(text)
    return (json.loads(m.group(1)), m.end()) if m else None


def closed_arguments(text: str, start: int) -> str | None:
    """The arguments' JSON text of a complete call (the outer `}` removed), or None when the
    call did not close (cut by `max_tokens`) or is not one."""
    rest = text[start:].rstrip()
    if not rest.endswith("}"):
        return None
    args = rest[:-1].rstrip()
    try:
        parsed = json.loads(text)
        return args if isinstance(parsed, dict) and isinstance(json.loads(args), dict) else None
    except ValueError:
        return None


def parse_tool_call(text: str, plan: ToolPlan | None) -> dict[str, Any] | None:
    """OpenAI's `tool_calls[i]` for a generated call, or None: a text answer (`auto`)."""
    head = call_head(text) if plan is not None else None
    if head is None:
        return None
    args = closed_arguments(text, head[1])
    if args is None:
        return None
    return {"id": call_id(), "type": "function", "function": {"name": head[0], "arguments": args}}


def _message(c: Choice, plan: ToolPlan | None) -> tuple[dict[str, Any], str]:
    text = c.result.generated_text
    call = parse_tool_call(text, plan)
    if call is not None:
        return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
    content = trim_stop(text, c.trimmer.stops, c.result.finish_reason)
    return {"role": "assistant", "content": content}, openai_finish_reason(c.result.finish_reason)


def chat_body(
    meta: ResponseMeta, choices: list[Choice], logprobs: bool, plan: ToolPlan | None = None
) -> dict[str, Any]:
    body = meta.envelope("chat.completion")
    body["choices"] = []
    for c in sorted(choices, key=lambda c: c.index):
        message, finish = _message(c, plan)
        body["choices"].append(
            {
                "index": c.index,
                "message": message,
                "logprobs": _logprobs(c, logprobs),
                "finish_reason": finish,
            }
        )
    body["usage"] = response_usage(choices)
    return body


def _chunk(
    meta: ResponseMeta, index: int, delta: dict[str, Any], logprobs: Any, finish: str | None
) -> dict[str, Any]:
    body = meta.envelope("chat.completion.chunk")
    body["choices"] = [
        {
            "index": index,
            "delta": {"role": "assistant", **delta},
            "logprobs": logprobs,
            "finish_reason": finish,
        }
    ]
    body["usage"] = None
    return body


@dataclass(slots=True)
class ToolStream:
    """One choice's streamed tool call. Text is held until it is known to be a call (the
    name has been generated: first delta) or a text answer (`auto`: it does not start with
    `{`); then argument text is sent as it comes, but for trailing `}` and spaces, which may
    be the call's closing brace (sent once they are known to be the arguments')."""

    plan: ToolPlan
    text: str = ""
    mode: str = ""  # "" undecided, "text", "call"
    start: int = 0  # where the arguments begin in `text`
    sent: int = 0  # characters of the arguments sent
    logprobs: list[Any] = field(default_factory=list)  # held with the text

    def push(self, piece: str, final: bool) -> list[dict[str, Any]]:
        """The deltas for this piece of text (`final`: the choice's last)."""
        self.text += piece
        if self.mode == "text":
            return [{"content": piece}] if piece or final else []
        out: list[dict[str, Any]] = []
        if not self.mode:
            stripped = self.text.lstrip()
            if self.plan.auto and stripped and not stripped.startswith("{"):
                self.mode = "text"
                return [{"content": self.text}]
            head = call_head(self.text)
            if head is None:
                return [{"content": self.text}] if final else []
            self.mode, self.start = "call", head[1]
            fn = {"name": head[0], "arguments": ""}
            out.append(
                {"tool_calls": [{"index": 0, "id": call_id(), "type": "function", "function": fn}]}
            )
        args = self.text[self.start :]
        if final:
            done = closed_arguments(self.text, self.start)
            upto = len(done) if done is not None else len(args)
        else:
            upto = len(args.rstrip(" \t\r\n}"))
        if upto > self.sent:
            fn = {"arguments": args[self.sent : upto]}
            out.append({"tool_calls": [{"index": 0, "function": fn}]})
            self.sent = upto
        return out

    def finish_reason(self, reason: str) -> str:
        if self.mode == "call" and closed_arguments(self.text, self.start) is not None:
            return "tool_calls"
        return openai_finish_reason(reason)


async def chat_stream(
    service: GenerationService,
    meta: ResponseMeta,
    choices: list[Choice],
    logprobs: bool,
    include_usage: bool,
    plan: ToolPlan | None = None,
) -> AsyncIterator[bytes]:
    """One chunk per token (special tokens as empty content, as TGI), choices interleaved;
    the last chunk of a choice carries its `finish_reason`; then the usage chunk when asked;
    an error after the start is TGI's OpenAI error event; always `[DONE]` at the end. With
    tools, each choice's text goes through a `ToolStream`."""
    calls = {c.index: ToolStream(plan) for c in choices} if plan is not None else {}
    try:
        async for item in with_keepalive(interleaved(service, choices)):
            if item is None:
                yield KEEP_ALIVE
                continue
            choice, ev = item
            content = choice.trimmer.push("" if ev.special else ev.text)
            finish = None
            if ev.finish_reason is not None:
                content += choice.trimmer.flush()
                finish = openai_finish_reason(ev.finish_reason.value)
            lp = None
            if logprobs:
                r = choice.result
                top = r.top_tokens[-1] if r.top_tokens else None
                lp = [logprob_entry(r.tokens[-1], top)]
            tool = calls.get(choice.index)
            if tool is None:
                lp = None if lp is None else {"content": lp}
                yield sse(_chunk(meta, choice.index, {"content": content}, lp, finish))
                continue
            tool.logprobs += lp or []
            deltas = tool.push(content, finish is not None)
            if finish is not None:
                finish = tool.finish_reason(ev.finish_reason.value)
                deltas = deltas or [{}]
            for i, delta in enumerate(deltas):
                last = i == len(deltas) - 1
                held, tool.logprobs = tool.logprobs, []
                lp = {"content": held} if logprobs else None
                yield sse(_chunk(meta, choice.index, delta, lp, finish if last else None))
        if include_usage:
            body = meta.envelope("chat.completion.chunk")
            body["choices"] = []
            body["usage"] = response_usage(choices)
            yield sse(body)
    except InferError as err:
        yield sse(error_event(err))
    yield DONE

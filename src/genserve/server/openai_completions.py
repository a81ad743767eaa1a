"""`/v1/completions` bodies: `text_completion` JSON and stream (TGI's shapes; OpenAI's
`finish_reason` vocabulary, `logprobs` object and `echo`; stop sequences left out)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from genserve.server.errors import InferError
from genserve.server.generation import GenerationService
from genserve.server.openai_chat import response_usage
from genserve.server.openai_run import DONE, Choice, error_event, interleaved, sse, trim_stop
from genserve.server.protocol import Token
from genserve.server.protocol_openai import ResponseMeta, openai_finish_reason, openai_logprob
from genserve.server.streaming import KEEP_ALIVE, with_keepalive


class Logprobs:
    """OpenAI's legacy completion logprobs: parallel lists, `text_offset` into the choice's
    text (the prompt included with `echo`)."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, choice: Choice, text: str, logprob: float | None, top: Any) -> None:
        self.tokens.append(text)
        self.token_logprobs.append(None if logprob is None else openai_logprob(logprob))
        self.top_logprobs.append(
            None if top is None else {t.text: openai_logprob(t.logprob) for t in top}
        )
        self.text_offset.append(choice.offset)
        choice.offset += len(text)

    def body(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


def _prompt_logprobs(out: Logprobs, choice: Choice) -> None:
    for i, tok in enumerate(choice.result.prefill):
        out.add(choice, tok.text, tok.logprob, None if i == 0 else [])


def _token_logprobs(out: Logprobs, choice: Choice, tokens: list[Token], tops: list) -> None:
    want_top = choice.valid.top_n_tokens > 0
    for i, tok in enumerate(tokens):
        top = (tops[i] if i < len(tops) else []) if want_top else None
        out.add(choice, tok.text, tok.logprob, top)


def completion_body(
    meta: ResponseMeta, choices: list[Choice], echo: bool, logprobs: bool
) -> dict[str, Any]:
    body = meta.envelope("text_completion")
    out = []
    for c in sorted(choices, key=lambda c: c.index):
        r = c.result
        text = trim_stop(r.generated_text, c.trimmer.stops, r.finish_reason)
        lp = None
        if logprobs:
            lp_acc = Logprobs()
            if echo:
                _prompt_logprobs(lp_acc, c)
            _token_logprobs(lp_acc, c, r.tokens, r.top_tokens)
            lp = lp_acc.body()
        out.append(
            {
                "index": c.index,
                "text": (c.valid.inputs if echo else "") + text,
                "logprobs": lp,
                "finish_reason": openai_finish_reason(r.finish_reason),
            }
        )
    body["choices"] = out
    body["usage"] = response_usage(choices)
    return body


def _stream_logprobs(choice: Choice, echo_now: bool) -> dict[str, Any]:
    acc = Logprobs()
    if echo_now:
        _prompt_logprobs(acc, choice)
    r = choice.result
    _token_logprobs(acc, choice, r.tokens[-1:], r.top_tokens[-1:])
    return acc.body()


async def completion_stream(
    service: GenerationService,
    meta: ResponseMeta,
    choices: list[Choice],
    echo: bool,
    logprobs: bool,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """A chunk per token, prompts and choices interleaved (`index` tells them apart); the
    last chunk of a choice carries its `finish_reason` and, as in TGI, its own `usage`."""
    try:
        async for item in with_keepalive(interleaved(service, choices)):
            if item is None:
                yield KEEP_ALIVE
                continue
            choice, ev = item
            text = choice.trimmer.push("" if ev.special else ev.text)
            echo_now = echo and choice.first
            if echo_now:
                text = choice.valid.inputs + text
                choice.first = False
            chunk = meta.envelope("text_completion")
            entry: dict[str, Any] = {"index": choice.index, "text": text, "logprobs": None}
            entry["finish_reason"] = None
            if logprobs:
                entry["logprobs"] = _stream_logprobs(choice, echo_now)
            chunk["choices"] = [entry]
            if ev.finish_reason is not None:
                entry["text"] += choice.trimmer.flush()
                entry["finish_reason"] = openai_finish_reason(ev.finish_reason.value)
                chunk["usage"] = response_usage([choice])
            yield sse(chunk)
        if include_usage:
            body = meta.envelope("text_completion")
            body["choices"] = []
            body["usage"] = response_usage(choices)
            yield sse(body)
    except InferError as err:
        yield sse(error_event(err))
    yield DONE

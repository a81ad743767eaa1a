"""`/v1/chat/completions` bodies: the `chat.completion` JSON and the `chat.completion.chunk`
stream (TGI's shapes, OpenAI's `finish_reason` vocabulary, stop sequences left out)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from genserve.server.errors import InferError
from genserve.server.generation import GenerationService
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


def chat_body(meta: ResponseMeta, choices: list[Choice], logprobs: bool) -> dict[str, Any]:
    body = meta.envelope("chat.completion")
    body["choices"] = [
        {
            "index": c.index,
            "message": {
                "role": "assistant",
                "content": trim_stop(
                    c.result.generated_text, c.trimmer.stops, c.result.finish_reason
                ),
            },
            "logprobs": _logprobs(c, logprobs),
            "finish_reason": openai_finish_reason(c.result.finish_reason),
        }
        for c in sorted(choices, key=lambda c: c.index)
    ]
    body["usage"] = response_usage(choices)
    return body


def _chunk(
    meta: ResponseMeta, index: int, content: str, logprobs: Any, finish_reason: str | None
) -> dict[str, Any]:
    body = meta.envelope("chat.completion.chunk")
    body["choices"] = [
        {
            "index": index,
            "delta": {"role": "assistant", "content": content},
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }
    ]
    body["usage"] = None
    return body


async def chat_stream(
    service: GenerationService,
    meta: ResponseMeta,
    choices: list[Choice],
    logprobs: bool,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """One chunk per token (special tokens as empty content, as TGI), choices interleaved;
    the last chunk of a choice carries its `finish_reason`; then the usage chunk when asked;
    an error after the start is TGI's OpenAI error event; always `[DONE]` at the end."""
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
                lp = {"content": [logprob_entry(r.tokens[-1], top)]}
            yield sse(_chunk(meta, choice.index, content, lp, finish))
        if include_usage:
            body = meta.envelope("chat.completion.chunk")
            body["choices"] = []
            body["usage"] = response_usage(choices)
            yield sse(body)
    except InferError as err:
        yield sse(error_event(err))
    yield DONE

"""The OpenAI-compatible request bodies (TGI's `ChatRequest`, `CompletionRequest`, plus the
OpenAI fields TGI ignores and genserve honours), and the small pieces every response shares.

Strict like serde (see `protocol.py`); unknown fields are ignored. Fields with no effect on the
output (`user`, `metadata`, `store`, `service_tier`, `parallel_tool_calls`) are never read;
fields that would change the output but are not supported get a 422 (never silently ignored).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from genserve.server.protocol import U32, U64
from genserve.server.settings import VERSION

# OpenAI shows a -inf logprob (a token no sampler could pick) as this number.
LOGPROB_FLOOR = -9999.0


class _Request(BaseModel):
    # as serde_json: no NaN/Infinity (a body error, never a parameter)
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class FunctionCall(_Request):
    name: str
    arguments: Any = None  # OpenAI: a JSON string; transformers' templates also take a dict
    description: str | None = None


class ToolCall(_Request):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class ContentPart(_Request):
    """`{"type":"text","text"}` or `{"type":"image_url","image_url":{"url"}}` (or an unsupported
    kind, rejected with a clear 422 in `openai_request`)."""

    type: str
    text: str | None = None
    image_url: Any = None


class ChatMessage(_Request):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """The sampling fields chat and completions share."""

    model: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    max_tokens: U32 | None = None
    n: U32 | None = None
    seed: U64 | None = None
    stop: list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        """OpenAI takes one string or a list."""
        return [value] if isinstance(value, str) else value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: U32 | None = None
    logprobs: bool | None = None
    top_logprobs: U32 | None = None
    # structured output: read and checked by `openai_request.grammar_for` (TGI's forms and OpenAI's)
    response_format: Any = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    tool_prompt: str | None = None

    @property
    def max_new_tokens(self) -> int | None:
        """`max_completion_tokens` is OpenAI's newer name for `max_tokens` (TGI's alias)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


class CompletionRequest(_Sampling):
    prompt: list[str] = Field(min_length=1)
    suffix: str | None = None
    echo: bool = False
    logprobs: U32 | None = None
    best_of: U32 | None = None
    repetition_penalty: float | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and not value:
            raise ValueError("Empty array detected. Do not use an empty array for the prompt.")
        return value


@dataclass(slots=True)
class ResponseMeta:
    """What every body and chunk of one response repeats."""

    prefix: str  # "chatcmpl" or "cmpl"
    model: str
    docker_label: str | None = None
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"{self.prefix}-{uuid.uuid4().hex}"

    @property
    def system_fingerprint(self) -> str:
        return f"{VERSION}-{self.docker_label or 'native'}"

    def envelope(self, obj: str) -> dict[str, Any]:
        return {
            "object": obj,
            "id": self.id,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
        }


def response_model(requested: str | None, served: str) -> str:
    """TGI echoes the request's `model` unless it is absent or `"tgi"`."""
    return requested if requested and requested != "tgi" else served


def openai_finish_reason(reason: str) -> str:
    """TGI's `eos_token` / `stop_sequence` are both OpenAI's `stop`."""
    return "length" if reason == "length" else "stop"


def openai_logprob(value: float | None) -> float:
    if value is None or math.isnan(value) or value == -math.inf:
        return LOGPROB_FLOOR
    return float(value)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }

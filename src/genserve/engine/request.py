"""A request's state inside the engine, its finish reasons and the events it emits."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from genserve.sampling.params import SamplingParams, StoppingParams


class RequestStatus(enum.IntEnum):
    """Ordered: everything above RUNNING... is finished (`is_finished`)."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


class FinishReason(enum.StrEnum):
    """TGI's values (`details.finish_reason`)."""

    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"


@dataclass(slots=True)
class TopToken:
    id: int
    text: str
    logprob: float
    special: bool


@dataclass(slots=True)
class TokenEvent:
    """One generated token, handed from the engine to whoever awaits the request.

    The last event of a request has `finish_reason` set and carries `generated_text`
    (decoded with special tokens skipped). An engine failure is an event with `error` set.
    """

    request_id: str
    token_id: int
    text: str
    logprob: float | None
    special: bool
    index: int  # 0-based position among generated tokens
    top_tokens: list[TopToken] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    generated_text: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    # first event only, when the request asked for prefill logprobs: one entry per prompt
    # token (the first is None: nothing predicts it)
    prompt_logprobs: list[float | None] | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(eq=False, slots=True)
class Request:
    """Token-level state of one generation.

    `num_computed_tokens` catches up with `num_tokens` (prompt + generated); the scheduler never
    needs to know whether that is prefill, chunked prefill, decode or a prefix-cache hit.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingParams = field(default_factory=StoppingParams)
    arrival_time: float = 0.0
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first schedule)
    block_table: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prefill_logprobs: bool = False

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

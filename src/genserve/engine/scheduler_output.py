"""The one plain object between the scheduler and the model runner."""

from __future__ import annotations

from dataclasses import dataclass, field

from genserve.engine.request import Request


@dataclass(slots=True)
class ScheduledRequest:
    """`num_new_tokens` tokens of `request`, starting at `request.num_computed_tokens`,
    are computed this step. Blocks for all of them are already in `request.block_table`.

    `start` and `samples` are fixed when the step is scheduled, so they stay true after the
    scheduler's update() and the engine's token append."""

    request: Request
    num_new_tokens: int
    start: int = field(init=False)
    samples: bool = field(init=False)  # the chunk reaches the last known token: sample one

    def __post_init__(self) -> None:
        self.start = self.request.num_computed_tokens
        self.samples = self.start + self.num_new_tokens == self.request.num_tokens

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

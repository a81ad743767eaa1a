"""The one plain object between the scheduler and the model runner."""

from __future__ import annotations

from dataclasses import dataclass, field

from genserve.engine.request import Request


@dataclass(slots=True)
class ScheduledRequest:
    """`num_new_tokens` tokens of `request`, starting at `request.num_computed_tokens`,
    are computed this step. Blocks for all of them are already in `request.block_table`."""

    request: Request
    num_new_tokens: int

    @property
    def start(self) -> int:
        return self.request.num_computed_tokens

    @property
    def end(self) -> int:
        return self.request.num_computed_tokens + self.num_new_tokens

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the last known token, so a new token is sampled."""
        return self.end == self.request.num_tokens


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

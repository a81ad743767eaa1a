"""Running the engine requests of one OpenAI response: n choices (times the prompts of a
completion), interleaved as their tokens arrive.

Each choice is an independent engine request, pumped by its own task into one queue; leaving
`interleaved` early (an error, a client that went away) cancels every pump, and each pump's
`finally` aborts its engine request. Permits are taken for all choices at once before anything
starts (429 otherwise) and given back exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from genserve.engine.request import TokenEvent
from genserve.server.errors import (
    GenerationError,
    IncompleteGenerationError,
    InferError,
    OverloadedError,
)
from genserve.server.generation import GenerationResult, GenerationService, Timing
from genserve.server.validation import ValidRequest

logger = logging.getLogger(__name__)


class StopTrimmer:
    """OpenAI leaves the stop sequence out of the text (TGI keeps it). Streamed text that could
    be the start of a stop sequence is held back until it is known not to be one."""

    __slots__ = ("stops", "pending", "done")

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.done = False

    def push(self, piece: str) -> str:
        if self.done or not self.stops:
            return "" if self.done else piece
        text = self.pending + piece
        cut = first_stop(text, self.stops)
        if cut is not None:
            self.done, self.pending = True, ""
            return text[:cut]
        hold = max((_overlap(text, s) for s in self.stops), default=0)
        self.pending = text[len(text) - hold :]
        return text[: len(text) - hold]

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return "" if self.done else out


def first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def trim_stop(text: str, stops: list[str], finish_reason: str) -> str:
    if finish_reason != "stop_sequence":
        return text
    cut = first_stop(text, stops)
    return text if cut is None else text[:cut]


def _overlap(text: str, stop: str) -> int:
    """The longest k < len(stop) with text ending in stop[:k]."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0


@dataclass(slots=True)
class Choice:
    """One engine request and what it produced so far."""

    index: int  # the OpenAI choice index
    prompt_index: int
    result: GenerationResult
    trimmer: StopTrimmer
    cached_tokens: int = 0
    first: bool = True  # no chunk sent yet
    offset: int = 0  # characters of text sent so far (completions' `text_offset`)

    @property
    def valid(self) -> ValidRequest:
        return self.result.valid


def new_choice(index: int, prompt_index: int, valid: ValidRequest, timing: Timing) -> Choice:
    result = GenerationResult(valid=valid, timing=Timing(timing.arrival, timing.queued))
    return Choice(index, prompt_index, result, StopTrimmer(valid.stopping.stop_sequences))


@dataclass(slots=True)
class Permits:
    """All-or-nothing permits for a response's choices, released once."""

    service: GenerationService
    n: int
    held: bool = field(default=False)

    def acquire(self) -> Permits:
        try:
            self.service.permits.acquire(self.n)
        except OverloadedError as err:
            raise self.service.fail(err) from None
        self.held = True
        return self

    def release(self) -> None:
        if self.held:
            self.held = False
            self.service.permits.release(self.n)


async def _pump(service: GenerationService, choice: Choice, queue: asyncio.Queue) -> None:
    try:
        async with aclosing(service.events(choice.valid, choice.result.timing)) as events:
            async for ev in events:
                queue.put_nowait((choice, ev))
                if ev.finished:
                    return
        queue.put_nowait((choice, service.fail(IncompleteGenerationError())))
    except InferError as err:
        queue.put_nowait((choice, err))
    except Exception as exc:  # noqa: BLE001 - never leave `interleaved` waiting
        logger.exception("engine request of choice %d failed", choice.index)
        queue.put_nowait((choice, service.fail(GenerationError(f"{type(exc).__name__}: {exc}"))))


async def interleaved(
    service: GenerationService, choices: list[Choice]
) -> AsyncIterator[tuple[Choice, TokenEvent]]:
    """Every choice's events as they come, absorbed into its result (an engine error raises
    GenerationError). Ends when all have finished; closing it aborts the unfinished."""
    queue: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.ensure_future(_pump(service, c, queue)) for c in choices]
    left = len(choices)
    try:
        while left:
            choice, item = await queue.get()
            if isinstance(item, InferError):
                raise item
            if item.index == 0:
                choice.cached_tokens = item.num_cached_tokens
            service.absorb(choice.result, item)
            if item.finished:
                left -= 1
                choice.result.timing.end = time.perf_counter()
                service.record_success(choice.result)
            yield choice, item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


async def run_to_end(service: GenerationService, choices: list[Choice]) -> None:
    """The non-streaming case: every choice to its end."""
    async with aclosing(interleaved(service, choices)) as events:
        async for _ in events:
            pass


class GuardedBody:
    """An SSE body that gives the permits back when it ends, however it ends, even if it was
    never iterated (a client gone before the first byte: an unstarted generator's `finally`
    would never run)."""

    def __init__(self, stream: AsyncIterator[bytes], permits: Permits) -> None:
        self.stream = stream
        self.permits = permits

    def __aiter__(self) -> GuardedBody:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.stream.__anext__()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        try:
            close = getattr(self.stream, "aclose", None)
            if close is not None:
                with contextlib.suppress(RuntimeError):
                    await close()
        finally:
            self.permits.release()


# OpenAI's framing, `data: ` with a space (TGI's native routes write `data:`): SSE parsers read
# both, but huggingface_hub's chat stream only recognizes the end as `data: [DONE]`.
DONE = b"data: [DONE]\n\n"


def sse(payload: Any) -> bytes:
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return b"data: " + text.encode() + b"\n\n"


def error_event(err: InferError) -> dict:
    """TGI's `into_openai_event`: the status is always 422; the stream still ends in [DONE]."""
    return {"error": {"message": err.message, "http_status_code": 422}}

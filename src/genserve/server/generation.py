"""Between the routes and the engine: permits, validation, one engine request, its results.

The TGI counterpart is `router/src/infer/mod.rs` (`Infer::generate_stream`, `generate`,
`generate_best_of`): a non-blocking permit (429 when none is left), then validation, then the
backend's event stream.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from genserve.engine.request import Request, TokenEvent
from genserve.server.errors import (
    GenerationError,
    IncompleteGenerationError,
    InferError,
    OverloadedError,
    ValidationError,
)
from genserve.server.metrics import ServerMetrics
from genserve.server.protocol import GenerateRequest, PrefillToken, Token
from genserve.server.validation import Validator, ValidRequest

logger = logging.getLogger(__name__)

ENGINE_DOWN = "the engine is not running"


class Engine(Protocol):
    """What the HTTP layer needs from `AsyncEngine`."""

    def generate(self, request: Request) -> AsyncIterator[TokenEvent]: ...


def logprob_or_none(value: float | None) -> float | None:
    """TGI sends NaN (the first prompt token) as `null`; JSON has no NaN."""
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return float(value)


def token_of(ev: Any) -> Token:
    return Token(
        id=ev.token_id, text=ev.text, logprob=logprob_or_none(ev.logprob), special=ev.special
    )


def top_tokens_of(ev: TokenEvent) -> list[Token]:
    return [
        Token(id=t.id, text=t.text, logprob=logprob_or_none(t.logprob), special=t.special)
        for t in ev.top_tokens
    ]


@dataclass(slots=True)
class Timing:
    """`time.perf_counter()` marks, TGI's `start_time`, `queued`, `start` and the end."""

    arrival: float
    queued: float = 0.0
    first_token: float = 0.0
    end: float = 0.0


@dataclass(slots=True)
class GenerationResult:
    valid: ValidRequest
    timing: Timing
    generated_text: str = ""
    finish_reason: str = "length"
    tokens: list[Token] = field(default_factory=list)
    top_tokens: list[list[Token]] = field(default_factory=list)
    prefill: list[PrefillToken] = field(default_factory=list)

    @property
    def mean_logprob(self) -> float:
        logprobs = [t.logprob if t.logprob is not None else 0.0 for t in self.tokens]
        return sum(logprobs) / max(len(logprobs), 1)


class Reservation:
    """A request that load shedding let through when it arrived, before its handler asks for
    permits: counted in `Permits.reserved` so that a burst parsed in one go is shed by arrival
    order instead of every request racing to its handler. Handed to the handler through a
    context variable; ends when the handler acquires permits or the request ends."""

    def __init__(self, permits: Permits) -> None:
        self.permits = permits
        self.held = True
        permits.reserved += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.permits.reserved -= 1


RESERVATION: contextvars.ContextVar[Reservation | None] = contextvars.ContextVar(
    "genserve_reservation", default=None
)


class Permits:
    """TGI's `try_acquire_owned` on a semaphore: never waits."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self.reserved = 0  # see Reservation

    @property
    def full(self) -> bool:
        """What load shedding refuses on: permits held plus requests on their way to them."""
        return self.in_use + self.reserved >= self.limit

    def acquire(self, n: int = 1) -> None:
        reservation = RESERVATION.get()
        if reservation is not None:  # this request's place now becomes its permits (or a 429)
            reservation.release()
        if 0 < self.limit < n:  # would never be admitted: retrying cannot help, so not a 429
            raise ValidationError(
                f"the request needs {n} sequences at once and at most {self.limit} run "
                "concurrently (`--max-concurrent-requests`)"
            )
        if self.in_use + n > self.limit:
            raise OverloadedError()
        self.in_use += n

    def release(self, n: int = 1) -> None:
        self.in_use -= n


class QueuedTokens:
    """Prompt tokens submitted to the engine whose first token has not come back yet
    (`--max-queued-tokens`). Past the limit a request is refused at once (429) instead of
    queueing for minutes; an empty queue always admits one request, however long."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.queued = 0

    def check(self, n: int) -> None:
        if self.limit is not None and self.queued and self.queued + n > self.limit:
            raise OverloadedError()

    def add(self, n: int) -> None:
        self.queued += n

    def remove(self, n: int) -> None:
        self.queued -= n


class GenerationService:
    def __init__(
        self,
        engine: Engine,
        validator: Validator,
        metrics: ServerMetrics,
        max_concurrent_requests: int,
        enable_prefill_logprobs: bool = False,
        token_text: Any = str,
        max_queued_tokens: int | None = None,
    ) -> None:
        self.token_text = token_text  # token id -> its text (skip_special_tokens=False)
        self.engine = engine
        self.validator = validator
        self.metrics = metrics
        self.permits = Permits(max_concurrent_requests)
        self.queued_tokens = QueuedTokens(max_queued_tokens)
        self.enable_prefill_logprobs = enable_prefill_logprobs

    def fail(self, err: InferError) -> InferError:
        self.metrics.failure(err.metric_label)
        return err

    async def validate(
        self, req: GenerateRequest, timing: Timing, add_special_tokens: bool = True
    ) -> ValidRequest:
        """Validation, then admission: a dead engine (424) or a full queue (429) fail fast.
        `add_special_tokens=False` for prompts a chat template rendered (TGI's chat route)."""
        try:
            if not getattr(self.engine, "healthy", True):
                raise GenerationError(ENGINE_DOWN)
            valid = await self.validator.validate(req, add_special_tokens)
            self.queued_tokens.check(valid.input_length)
        except InferError as err:
            raise self.fail(err) from None
        self.metrics.input_length.observe(valid.input_length)
        self.metrics.max_new_tokens.observe(valid.max_new_tokens_chunk)
        timing.queued = time.perf_counter()
        return valid

    def engine_request(self, valid: ValidRequest) -> Request:
        return Request(
            request_id=uuid.uuid4().hex,
            prompt_token_ids=list(valid.input_ids),
            sampling=replace(valid.sampling),
            stopping=replace(valid.stopping, stop_sequences=list(valid.stopping.stop_sequences)),
            prefill_logprobs=valid.decoder_input_details and self.enable_prefill_logprobs,
        )

    async def events(self, valid: ValidRequest, timing: Timing) -> AsyncIterator[TokenEvent]:
        """The engine's events for one request, with TTFT / ITL recorded. Closing this iterator
        (or cancelling its consumer) closes the engine's, which aborts the request."""
        last = 0.0
        gen = self.engine.generate(self.engine_request(valid))
        queued = valid.input_length  # counted until the first event comes back
        self.queued_tokens.add(queued)
        try:
            async for ev in gen:
                self.queued_tokens.remove(queued)
                queued = 0
                now = time.perf_counter()
                if not timing.first_token:
                    timing.first_token = now
                    self.metrics.ttft.observe(now - timing.arrival)
                else:
                    self.metrics.itl.observe(now - last)
                last = now
                yield ev
        finally:
            self.queued_tokens.remove(queued)
            await _aclose(gen)

    async def generate(self, req: GenerateRequest, arrival: float) -> GenerationResult:
        """`Infer::generate`: one sequence, the permit held until it is done."""
        try:
            self.permits.acquire()
        except OverloadedError as err:
            raise self.fail(err) from None
        try:
            timing = Timing(arrival=arrival)
            valid = await self.validate(req, timing)
            result = GenerationResult(valid=valid, timing=timing)
            async with aclosing(self.events(valid, timing)) as events:
                async for ev in events:
                    self.absorb(result, ev)
                    if ev.finished:
                        break
                else:
                    raise self.fail(IncompleteGenerationError())
            timing.end = time.perf_counter()
            return result
        finally:
            self.permits.release()

    def absorb(self, result: GenerationResult, ev: TokenEvent) -> None:
        if ev.error is not None:
            raise self.fail(GenerationError(ev.error))
        if ev.index == 0 and result.valid.decoder_input_details:
            result.prefill = self.prefill_tokens(result.valid.input_ids, ev.prompt_logprobs)
        result.tokens.append(token_of(ev))
        if result.valid.top_n_tokens > 0:
            result.top_tokens.append(top_tokens_of(ev))
        if ev.finish_reason is not None:
            result.finish_reason = ev.finish_reason.value
            result.generated_text = ev.generated_text or ""

    def prefill_tokens(
        self, ids: list[int], logprobs: list[float | None] | None
    ) -> list[PrefillToken]:
        """`details.prefill`: empty unless `--enable-prefill-logprobs`, as in TGI; the first
        prompt token has no logprob (nothing predicts it)."""
        if not self.enable_prefill_logprobs or logprobs is None:
            return []
        text = self.token_text
        return [
            PrefillToken(id=i, text=text(i), logprob=logprob_or_none(lp))
            for i, lp in zip(ids, logprobs, strict=False)
        ]

    async def generate_best_of(
        self, req: GenerateRequest, best_of: int, arrival: float
    ) -> tuple[GenerationResult, list[GenerationResult]]:
        """`Infer::generate_best_of`: n independent sampled requests (each validated, each with
        its own random seed and permit); the best has the highest mean token logprob."""
        try:
            self.validator.validate_best_of(best_of)
        except InferError as err:
            raise self.fail(err) from None
        tasks = [asyncio.ensure_future(self.generate(req, arrival)) for _ in range(best_of)]
        try:
            results = list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        best = max(range(len(results)), key=lambda i: results[i].mean_logprob)
        return results.pop(best), results

    def record_success(self, result: GenerationResult) -> None:
        t = result.timing
        m = self.metrics
        n = max(len(result.tokens), 1)
        m.request_success.inc()
        m.request_duration.observe(t.end - t.arrival)
        m.validation_duration.observe(t.queued - t.arrival)
        m.queue_duration.observe(max(t.first_token - t.queued, 0.0))
        m.inference_duration.observe(t.end - t.first_token)
        m.time_per_token.observe((t.end - t.first_token) / n)
        m.generated_tokens.observe(len(result.tokens))


async def _aclose(gen: Any) -> None:
    close = getattr(gen, "aclose", None)
    if close is not None:
        try:
            await close()
        except RuntimeError:  # already running (closed from another task): its own finally aborts
            logger.debug("engine iterator already closing")

"""`/generate_stream` (and `/` with `stream:true`): TGI's `generate_stream_internal`.

Validation and overload happen inside the stream, after the 200 went out, so they arrive as
SSE error events, as in TGI. The permit is held for the life of the stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from genserve.server.errors import (
    GenerationError,
    IncompleteGenerationStreamError,
    InferError,
    OverloadedError,
    ValidationError,
)
from genserve.server.generation import GenerationResult, GenerationService, Timing
from genserve.server.protocol import GenerateRequest, StreamDetails, dump
from genserve.server.responses import stream_token
from genserve.server.streaming import KEEP_ALIVE, sse_data, with_keepalive

logger = logging.getLogger(__name__)


def _stream_only_checks(req: GenerateRequest) -> InferError | None:
    p = req.parameters
    if (1 if p.best_of is None else p.best_of) != 1:
        return ValidationError("`best_of` != 1 is not supported when streaming tokens")
    if p.decoder_input_details:
        return ValidationError(
            "`decoder_input_details` == true is not supported when streaming tokens"
        )
    return None


async def tgi_stream(
    service: GenerationService, req: GenerateRequest, arrival: float
) -> AsyncIterator[bytes]:
    err = _stream_only_checks(req)
    if err is not None:
        yield sse_data(service.fail(err).body())
        return
    try:
        service.permits.acquire()
    except OverloadedError as exc:
        yield sse_data(service.fail(exc).body())
        return
    try:
        async for chunk in _stream_events(service, req, arrival):
            yield chunk
    finally:
        service.permits.release()


async def _stream_events(
    service: GenerationService, req: GenerateRequest, arrival: float
) -> AsyncIterator[bytes]:
    timing = Timing(arrival=arrival)
    try:
        valid = await service.validate(req, timing)
    except InferError as exc:
        yield sse_data(exc.body())
        return
    result = GenerationResult(valid=valid, timing=timing)
    prefix = req.inputs if req.parameters.return_full_text else ""
    index = 0
    async for ev in with_keepalive(service.events(valid, timing)):
        if ev is None:
            yield KEEP_ALIVE
            continue
        index += 1
        if ev.error is not None:
            yield sse_data(service.fail(GenerationError(ev.error)).body())
            return
        service.absorb(result, ev)
        if ev.finish_reason is None:
            yield sse_data(dump(stream_token(index, ev, valid.top_n_tokens)))
            continue
        timing.end = time.perf_counter()
        details = None
        if req.parameters.details:
            details = StreamDetails(
                finish_reason=result.finish_reason,
                generated_tokens=len(result.tokens),
                seed=valid.seed_reported,
                input_length=valid.input_length,
            )
        final = stream_token(index, ev, valid.top_n_tokens, prefix + result.generated_text, details)
        service.record_success(result)
        yield sse_data(dump(final))
        return
    yield sse_data(service.fail(IncompleteGenerationStreamError()).body())

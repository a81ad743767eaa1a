"""TGI's native routes (`router/src/server.rs`, `vertex.rs`, `sagemaker.rs`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from genserve.server.body import parse_obj, read_json, read_json_value
from genserve.server.errors import RequestBodyError
from genserve.server.generation import GenerationService
from genserve.server.metrics import CONTENT_TYPE
from genserve.server.openapi import (
    ANY_JSON_OR_SSE,
    ERROR_RESPONSES,
    STREAM_ERROR_RESPONSES,
    body_ref,
    json_or_stream,
    json_ref,
)
from genserve.server.protocol import (
    CompatGenerateRequest,
    GenerateParameters,
    GenerateRequest,
    Info,
    SimpleToken,
    VertexRequest,
    VertexResponse,
    dump,
)
from genserve.server.responses import generate_headers, generate_response, stream_headers
from genserve.server.settings import ROUTER, VERSION, ServerSettings
from genserve.server.streaming import (
    ClientDisconnected,
    SSEResponse,
    cancel_on_disconnect,
    disconnected_response,
)
from genserve.server.tgi_stream import tgi_stream

router = APIRouter(tags=["Text Generation Inference"])


def _service(request: Request) -> GenerationService:
    return request.app.state.service


def _settings(request: Request) -> ServerSettings:
    return request.app.state.settings


async def generate_json(request: Request, req: GenerateRequest, arrival: float) -> tuple[Any, dict]:
    """`generate_internal`: one sequence or best_of; returns (GenerateResponse, headers)."""
    service = _service(request)
    service.metrics.request_count.inc()
    p = req.parameters
    if p.best_of is not None and p.best_of > 1:
        best, others = await service.generate_best_of(req, p.best_of, arrival)
    else:
        best, others = await service.generate(req, arrival), None
    service.record_success(best)
    add_prompt = req.inputs if p.return_full_text else None
    body = generate_response(best, others, p.details or p.decoder_input_details, add_prompt)
    return body, generate_headers(best, _settings(request).compute_type)


async def _json_or_disconnect(
    request: Request, work: Awaitable[tuple[Any, dict]], wrap: Callable[[Any], Any] = dump
) -> Response:
    try:
        body, headers = await cancel_on_disconnect(request, work)
    except ClientDisconnected:
        return disconnected_response()
    return JSONResponse(wrap(body), headers=headers)


def stream_response(request: Request, req: GenerateRequest, arrival: float) -> SSEResponse:
    service = _service(request)
    service.metrics.request_count.inc()
    headers = stream_headers(req.inputs, _settings(request).compute_type)
    return SSEResponse(tgi_stream(service, req, arrival), headers=headers)


@router.post(
    "/generate",
    summary="Generate tokens",
    openapi_extra=body_ref("GenerateRequest"),
    responses={200: json_ref("Generated Text", "GenerateResponse"), **ERROR_RESPONSES},
)
async def generate(request: Request) -> Response:
    arrival = time.perf_counter()
    req = await read_json(request, GenerateRequest, _settings(request).payload_limit)
    return await _json_or_disconnect(request, generate_json(request, req, arrival))


@router.post(
    "/generate_stream",
    summary="Generate a stream of token using Server-Sent Events",
    openapi_extra=body_ref("GenerateRequest"),
    responses=STREAM_ERROR_RESPONSES,
)
async def generate_stream(request: Request) -> Response:
    arrival = time.perf_counter()
    req = await read_json(request, GenerateRequest, _settings(request).payload_limit)
    return stream_response(request, req, arrival)


async def compat(request: Request, req: CompatGenerateRequest, arrival: float) -> Response:
    if req.parameters.return_full_text is None:
        req.parameters.return_full_text = _settings(request).compat_return_full_text
    if req.stream:
        return stream_response(request, req, arrival)
    return await _json_or_disconnect(
        request, generate_json(request, req, arrival), wrap=lambda body: [dump(body)]
    )


@router.post(
    "/",
    summary="Generate tokens if `stream == false` or a stream of token if `stream == true`",
    openapi_extra=body_ref("CompatGenerateRequest"),
    responses={
        200: json_or_stream("Generated Text", "GenerateResponse", array=True),
        **ERROR_RESPONSES,
    },
)
async def compat_generate(request: Request) -> Response:
    arrival = time.perf_counter()
    req = await read_json(request, CompatGenerateRequest, _settings(request).payload_limit)
    return await compat(request, req, arrival)


@router.post(
    "/invocations",
    summary="Generate tokens from Sagemaker request",
    openapi_extra=body_ref("CompatGenerateRequest"),
    responses={200: ANY_JSON_OR_SSE, **ERROR_RESPONSES},  # generate, chat or completions
)
async def invocations(request: Request) -> Response:
    """An untagged union tried in TGI's order: generate (`inputs`), then the branches other
    modules register in `app.state.invocation_branches` (chat `messages`, completions
    `prompt`)."""
    arrival = time.perf_counter()
    obj = await read_json_value(request, _settings(request).payload_limit)
    if isinstance(obj, dict) and "inputs" in obj:
        return await compat(request, parse_obj(obj, CompatGenerateRequest), arrival)
    for matches, handler in request.app.state.invocation_branches:
        if isinstance(obj, dict) and matches(obj):
            return await handler(request, obj, arrival)
    raise RequestBodyError(
        422,
        "Failed to deserialize the JSON body into the target type: "
        "data did not match any variant of untagged enum SagemakerRequest",
    )


@router.post(
    "/vertex",
    summary="Generate tokens from Vertex request",
    openapi_extra=body_ref("VertexRequest"),
    responses={200: json_ref("Generated Text", "VertexResponse"), **ERROR_RESPONSES},
)
async def vertex(request: Request) -> Response:
    arrival = time.perf_counter()
    req = await read_json(request, VertexRequest, _settings(request).payload_limit)
    _service(request).metrics.request_count.inc()
    if not req.instances:
        body = {"error": "Input validation error", "error_type": "Input validation error"}
        return JSONResponse(body, status_code=422)
    work = asyncio.gather(*(_vertex_one(request, inst, arrival) for inst in req.instances))
    try:
        predictions = await cancel_on_disconnect(request, work)
    except ClientDisconnected:
        return disconnected_response()
    # an instance's error (a 422 for a bad instance, 429, 424) is the answer: never a 500
    return JSONResponse(VertexResponse(predictions=list(predictions)).model_dump())


async def _vertex_one(request: Request, inst: Any, arrival: float) -> str:
    """Only `max_new_tokens` and `seed` are taken; sampling is forced, as in TGI."""
    given = inst.parameters
    params = GenerateParameters(
        do_sample=True,
        max_new_tokens=given.max_new_tokens if given else None,
        seed=given.seed if given else None,
        details=True,
        decoder_input_details=True,
    )
    body, _ = await generate_json(
        request, GenerateRequest(inputs=inst.inputs, parameters=params), arrival
    )
    return body.generated_text


@router.post(
    "/tokenize",
    summary="Tokenize inputs",
    openapi_extra=body_ref("GenerateRequest"),
    responses={200: json_ref("Tokenized ids", "TokenizeResponse"), **ERROR_RESPONSES},
)
async def tokenize(request: Request) -> Response:
    """`truncate` is ignored, as in TGI; `start`/`stop` are byte offsets."""
    req = await read_json(request, GenerateRequest, _settings(request).payload_limit)
    tokens = await asyncio.to_thread(_simple_tokens, request.app.state.tokenizer, req.inputs)
    return JSONResponse([t.model_dump() for t in tokens])


def _simple_tokens(tokenizer: Any, text: str) -> list[SimpleToken]:
    enc = tokenizer.encode_with_offsets(text, add_special_tokens=True)
    return [
        SimpleToken(id=i, text=t, start=a, stop=b)
        for i, t, a, b in zip(enc.ids, enc.texts, enc.starts, enc.stops, strict=True)
    ]


@router.get("/info", summary="Text Generation Inference endpoint info", response_model=Info)
async def info(request: Request) -> Response:
    s = _settings(request)
    body = Info(
        model_id=s.model_id,
        model_sha=s.model_sha,
        model_pipeline_tag=s.model_pipeline_tag,
        max_concurrent_requests=s.max_concurrent_requests,
        max_best_of=s.max_best_of,
        max_stop_sequences=s.max_stop_sequences,
        max_input_tokens=s.max_input_tokens,
        max_total_tokens=s.max_total_tokens,
        validation_workers=s.validation_workers,
        max_client_batch_size=s.max_client_batch_size,
        router=ROUTER,
        version=VERSION,
        sha=s.sha,
        docker_label=s.docker_label,
    )
    return JSONResponse(body.model_dump())


HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Everything is working fine"},
    503: json_ref("Text generation inference is down", "ErrorResponse"),
}


async def _health(request: Request) -> Response:
    if request.app.state.lifecycle.ready:  # the engine runs and the server is not draining
        return Response(status_code=200)
    return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)


@router.get(
    "/health", summary="Health check method", responses=HEALTH_RESPONSES, response_class=Response
)
async def health(request: Request) -> Response:
    return await _health(request)


@router.get("/", include_in_schema=False)
async def health_root(request: Request) -> Response:
    return await _health(request)


@router.get("/ping", include_in_schema=False)
async def ping(request: Request) -> Response:
    return await _health(request)


@router.get(
    "/metrics",
    summary="Prometheus metrics scrape endpoint",
    responses={
        200: {
            "description": "Prometheus Metrics",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
async def metrics(request: Request) -> Response:
    engine = request.app.state.engine
    m = _service(request).metrics
    m.queue_size.set(getattr(engine, "num_waiting", 0))
    m.batch_size.set(getattr(engine, "num_running", 0))
    m.batch_max_total_tokens.set(getattr(engine, "kv_capacity_tokens", 0) or 0)
    return Response(m.render(), media_type=CONTENT_TYPE)

"""The OpenAI-compatible routes (TGI's `chat_completions`, `completions`,
`openai_get_model_info`, `get_chat_tokenize`) and their `/invocations` branches.

Everything that can fail before the first token (the template, validation, permits) fails
before the response starts, as TGI's JSON error with its status; after that, errors arrive as
the OpenAI error event, then `[DONE]`. See docs/openai.md for where genserve follows OpenAI
rather than TGI.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from genserve.server import openai_request as oreq
from genserve.server.body import parse_obj, read_json
from genserve.server.errors import InferError, ValidationError
from genserve.server.generation import GenerationService
from genserve.server.openai_chat import chat_body, chat_stream
from genserve.server.openai_completions import completion_body, completion_stream
from genserve.server.openai_run import Choice, GuardedBody, Permits, new_choice, run_to_end
from genserve.server.openapi import ANY_JSON_OR_SSE, ERROR_RESPONSES, REF, body_ref
from genserve.server.protocol import GenerateRequest, SimpleToken
from genserve.server.protocol_openai import (
    ChatRequest,
    CompletionRequest,
    ResponseMeta,
    response_model,
)
from genserve.server.responses import generate_headers, stream_headers
from genserve.server.settings import ServerSettings
from genserve.server.streaming import (
    ClientDisconnected,
    SSEResponse,
    cancel_on_disconnect,
    disconnected_response,
)
from genserve.tokenization import chat_template as ct

logger = logging.getLogger(__name__)

T = TypeVar("T")

router = APIRouter(tags=["Text Generation Inference"])

_TIME_HEADERS = ("x-total-time", "x-validation-time", "x-queue-time", "x-inference-time",
                 "x-time-per-token", "x-prompt-tokens", "x-generated-tokens")  # fmt: skip


class RouteError(InferError):
    """TGI's fixed-text 422s of the completions route (their own `error_type`)."""

    status = 422

    def __init__(self, message: str, error_type: str) -> None:
        super().__init__(message)
        self.error_type = error_type


def install(app: FastAPI) -> None:
    """Add the routes, load the chat template and register the `/invocations` branches."""
    app.include_router(router)
    app.state.chat_template = load_template(app.state.tokenizer, app.state.settings)
    app.state.invocation_branches.extend(
        [(lambda o: "messages" in o, _invoke_chat), (lambda o: "prompt" in o, _invoke_completion)]
    )
    base = app.openapi

    def openapi() -> dict[str, Any]:
        doc = base()
        _, defs = models_json_schema(
            [(ChatRequest, "validation"), (CompletionRequest, "validation")], ref_template=REF
        )
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for name, schema in defs.get("$defs", {}).items():
            schemas.setdefault(name, schema)
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def load_template(tokenizer: Any, settings: ServerSettings) -> ct.ChatTemplate | Exception:
    """The template, or the error every chat request will answer with (a 422, as TGI)."""
    config_path = getattr(settings, "tokenizer_config_path", None)
    try:
        return ct.ChatTemplate.load(
            getattr(tokenizer, "source_dir", None),
            tokenizer,
            Path(config_path) if config_path else None,
        )
    except ct.TemplateError as e:
        if not isinstance(e, ct.NoTemplateError):
            logger.error("the chat template does not compile: %s", e)
        return e


def _service(request: Request) -> GenerationService:
    return request.app.state.service


def _settings(request: Request) -> ServerSettings:
    return request.app.state.settings


def _vocab_size(request: Request) -> int:
    return int(getattr(request.app.state.tokenizer, "vocab_size", 0) or 2**31)


def _headers(choices: list[Choice], compute_type: str, sums_only: bool) -> dict[str, str]:
    """The `/generate` headers of the first choice; with several, TGI's sums over all
    (no `x-compute-time` on completions)."""
    headers = generate_headers(choices[0].result, compute_type)
    if len(choices) == 1 and not sums_only:
        return headers
    for c in choices[1:]:
        other = generate_headers(c.result, compute_type)
        for key in _TIME_HEADERS:
            headers[key] = str(int(headers[key]) + int(other[key]))
        headers["x-compute-characters"] = str(
            int(headers["x-compute-characters"]) + int(other["x-compute-characters"])
        )
    if sums_only:
        headers.pop("x-compute-time", None)
    return headers


async def _admitted(permits: Permits, work: Awaitable[T]) -> T:
    """`work` (validation) with the permits held; they go back if it fails."""
    try:
        return await work
    except BaseException:
        permits.release()
        raise


async def _json(
    request: Request, choices: list[Choice], permits: Permits, body: Callable[[], Any],
    headers: Callable[[], dict[str, str]],
) -> Response:  # fmt: skip
    """Every choice to its end (a client that leaves aborts them all), then `body()`."""
    try:
        await cancel_on_disconnect(request, run_to_end(_service(request), choices))
    except ClientDisconnected:
        return disconnected_response()
    finally:
        permits.release()
    return JSONResponse(body(), headers=headers())


# ------------------------------------------------------------------------------ chat


def prepare_chat(
    request: Request, req: ChatRequest
) -> tuple[str, GenerateRequest, oreq.ToolPlan | None]:
    """(prompt, GenerateRequest, tool plan), or a 422 (template, tools, parameters)."""
    service = _service(request)
    try:
        grammar, plan = oreq.grammar_for(req)
        prompt = oreq.render_chat(request.app.state.chat_template, req.messages, plan)
    except InferError as err:
        raise service.fail(err) from None
    top_n = req.top_logprobs if req.logprobs else None
    params = oreq.generate_parameters(req, req.max_new_tokens, top_n, grammar=grammar)
    return prompt, GenerateRequest(inputs=prompt, parameters=params), plan


async def chat(request: Request, req: ChatRequest, arrival: float) -> Response:
    service, settings = _service(request), _settings(request)
    service.metrics.request_count.inc()
    prompt, gen_req, plan = prepare_chat(request, req)
    try:
        extras = oreq.extras_of(req, _vocab_size(request))
    except InferError as err:
        raise service.fail(err) from None
    permits = Permits(service, extras.n).acquire()
    valid, timing = await _admitted(permits, oreq.validate(service, gen_req, False, arrival))
    variants = oreq.choices_of(valid, extras, req.seed is not None)
    choices = [new_choice(i, 0, v, timing) for i, v in enumerate(variants)]
    service.metrics.request_count.inc(len(choices) - 1)  # one per engine request, as TGI
    model = response_model(req.model, settings.model_id)
    meta = ResponseMeta("chatcmpl", model, settings.docker_label)
    logprobs = bool(req.logprobs)
    if req.stream:
        stream = chat_stream(service, meta, choices, logprobs, req.include_usage, plan)
        headers = stream_headers(prompt, settings.compute_type)
        return SSEResponse(GuardedBody(stream, permits), headers=headers)
    return await _json(
        request, choices, permits,
        lambda: chat_body(meta, choices, logprobs, plan),
        lambda: _headers(choices, settings.compute_type, sums_only=False),
    )  # fmt: skip


@router.post(
    "/v1/chat/completions",
    summary="Generate tokens",
    openapi_extra=body_ref("ChatRequest"),
    responses={200: ANY_JSON_OR_SSE, **ERROR_RESPONSES},  # JSON, or SSE if `stream`
)
async def chat_completions(request: Request) -> Response:
    arrival = time.perf_counter()
    req = await read_json(request, ChatRequest, _settings(request).payload_limit)
    return await chat(request, req, arrival)


async def _invoke_chat(request: Request, obj: dict, arrival: float) -> Response:
    return await chat(request, parse_obj(obj, ChatRequest), arrival)


@router.post(
    "/chat_tokenize",
    summary="Template and tokenize ChatRequest",
    openapi_extra=body_ref("ChatRequest"),
    responses=ERROR_RESPONSES,
)
async def chat_tokenize(request: Request) -> Response:
    req = await read_json(request, ChatRequest, _settings(request).payload_limit)
    _service(request).metrics.request_count.inc()
    prompt, _, _ = prepare_chat(request, req)
    tokenizer = request.app.state.tokenizer
    enc = await asyncio.to_thread(tokenizer.encode_with_offsets, prompt, False)
    tokens = [
        SimpleToken(id=i, text=t, start=a, stop=b).model_dump()
        for i, t, a, b in zip(enc.ids, enc.texts, enc.starts, enc.stops, strict=True)
    ]
    return JSONResponse({"tokenize_response": tokens, "templated_text": prompt})


# ------------------------------------------------------------------------------ completions


def _check_completion(req: CompletionRequest, settings: ServerSettings) -> None:
    if req.suffix is not None:
        raise RouteError(
            "Suffix is not supported and can be achieved by preprocessing the prompt.",
            "suffix not supported",
        )
    if len(req.prompt) > settings.max_client_batch_size:
        raise RouteError(
            "Number of prompts exceeds the maximum allowed batch size of "
            f"{settings.max_client_batch_size}",
            "batch size exceeded",
        )
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise ValidationError("`best_of` is not supported on /v1/completions; use `n`")
    if req.echo and req.logprobs is not None and not settings.enable_prefill_logprobs:
        raise ValidationError(
            "`echo` with `logprobs` needs prompt logprobs: start the server with "
            "--enable-prefill-logprobs"
        )


async def completion(request: Request, req: CompletionRequest, arrival: float) -> Response:
    service, settings = _service(request), _settings(request)
    service.metrics.request_count.inc()
    try:
        _check_completion(req, settings)
        extras = oreq.extras_of(req, _vocab_size(request))
    except InferError as err:
        raise service.fail(err) from None
    want_lp = req.logprobs is not None
    params = oreq.generate_parameters(
        req, req.max_tokens, req.logprobs, decoder_input_details=req.echo and want_lp,
        repetition_penalty=req.repetition_penalty,
    )  # fmt: skip
    permits = Permits(service, extras.n * len(req.prompt)).acquire()
    validated = await _admitted(permits, asyncio.gather(*(
        oreq.validate(service, GenerateRequest(inputs=p, parameters=params), True, arrival)
        for p in req.prompt
    )))  # fmt: skip
    choices = [
        new_choice(p * extras.n + j, p, v, timing)
        for p, (valid, timing) in enumerate(validated)
        for j, v in enumerate(oreq.choices_of(valid, extras, req.seed is not None))
    ]
    service.metrics.request_count.inc(len(choices) - 1)
    meta = ResponseMeta("cmpl", settings.model_id, settings.docker_label)
    if req.stream:
        stream = completion_stream(service, meta, choices, req.echo, want_lp, req.include_usage)
        headers = stream_headers("".join(req.prompt), settings.compute_type)
        return SSEResponse(GuardedBody(stream, permits), headers=headers)
    return await _json(
        request, choices, permits,
        lambda: completion_body(meta, choices, req.echo, want_lp),
        lambda: _headers(choices, settings.compute_type, sums_only=True),
    )  # fmt: skip


@router.post(
    "/v1/completions",
    summary="Complete text",
    openapi_extra=body_ref("CompletionRequest"),
    responses={200: ANY_JSON_OR_SSE, **ERROR_RESPONSES},  # JSON, or SSE if `stream`
)
async def completions(request: Request) -> Response:
    arrival = time.perf_counter()
    req = await read_json(request, CompletionRequest, _settings(request).payload_limit)
    return await completion(request, req, arrival)


async def _invoke_completion(request: Request, obj: dict, arrival: float) -> Response:
    return await completion(request, parse_obj(obj, CompletionRequest), arrival)


# ------------------------------------------------------------------------------ models


@router.get("/v1/models", summary="Get model info")
async def models(request: Request) -> Response:
    model_id = _settings(request).model_id
    data = [{"id": model_id, "object": "model", "created": 0, "owned_by": model_id}]
    return JSONResponse({"object": "list", "data": data})

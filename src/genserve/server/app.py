"""build_app(): the FastAPI application around one engine.

The lifespan starts and stops the engine; InferError and body errors map to TGI's
`{"error", "error_type"}` JSON; anything unexpected is a 500 with a generic message (the
traceback goes to the log, never into a body).
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from genserve.sampling.grammar import GrammarCompiler
from genserve.server.auth import ApiKeyMiddleware
from genserve.server.errors import InferError
from genserve.server.generation import GenerationService
from genserve.server.lifecycle import Lifecycle, LifecycleMiddleware
from genserve.server.lifecycle import router as probes_router
from genserve.server.limits import RequestLimitsMiddleware
from genserve.server.metrics import ServerMetrics
from genserve.server.openapi import build_openapi
from genserve.server.routes_openai import install as install_openai
from genserve.server.routes_tgi import router as tgi_router
from genserve.server.settings import ServerSettings
from genserve.server.shedding import FastShed, ShedMiddleware
from genserve.server.validation import Validator

logger = logging.getLogger(__name__)

RETRY_AFTER_S = "1"


async def _call(obj: Any, *names: str, in_thread: bool = False) -> None:
    """Call the first of `names` that `obj` has: awaited if async; a sync one runs on the loop
    (`start` binds the running loop) or, with `in_thread`, in a worker thread (a blocking join)."""
    for name in names:
        fn = getattr(obj, name, None)
        if fn is None:
            continue
        if inspect.iscoroutinefunction(fn):
            await fn()
        elif in_thread:
            await asyncio.to_thread(fn)
        else:
            fn()
        return


def freeze_startup_heap() -> None:
    """Moves everything alive after start-up (model modules, tokenizer tables, routes, schemas)
    out of the garbage collector's reach: a full collection then scans only what requests
    create. Without it a collection scanned the whole heap, pausing the event loop and the
    engine for 150-190 ms now and then (measured with `bench/overload.py`)."""
    gc.collect()
    gc.freeze()


def build_app(engine: Any, settings: ServerSettings, tokenizer: Any = None) -> FastAPI:
    """`tokenizer` defaults to `engine.tokenizer`."""
    tokenizer = tokenizer if tokenizer is not None else engine.tokenizer
    metrics = ServerMetrics(settings.max_input_tokens, settings.max_total_tokens)
    # a request that could never fit the KV cache is a 422 at validation, never a hang
    limits = replace(
        settings.limits, kv_capacity_tokens=getattr(engine, "max_request_tokens", None)
    )
    validator = Validator(
        limits,
        lambda text, special: list(tokenizer.encode(text, add_special_tokens=special)),
        workers=settings.validation_workers,
        grammars=GrammarCompiler.for_tokenizer(tokenizer),  # None: grammars are refused
    )
    service = GenerationService(
        engine,
        validator,
        metrics,
        settings.max_concurrent_requests,
        enable_prefill_logprobs=settings.enable_prefill_logprobs,
        token_text=getattr(tokenizer, "token_text", str),
        max_queued_tokens=settings.max_queued_tokens,
    )
    lifecycle = Lifecycle(engine, settings.graceful_termination_timeout)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await _call(engine, "start")
        freeze_startup_heap()
        try:
            yield
        finally:
            await _call(engine, "stop", "shutdown", in_thread=True)
            validator.close()

    app = FastAPI(
        title="Text Generation Inference",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/api-doc/openapi.json",
    )
    app.state.engine = engine
    # the same refusal, given by the HTTP protocol itself before any ASGI work (limits.py)
    app.state.fast_shed = FastShed(service, lifecycle, settings.api_key, RETRY_AFTER_S)
    app.state.settings = settings
    app.state.service = service
    app.state.lifecycle = lifecycle
    app.state.tokenizer = tokenizer
    # (predicate(body) -> bool, handler(request, body, arrival)) for `/invocations` branches
    app.state.invocation_branches = []
    app.include_router(tgi_router)
    app.include_router(probes_router)
    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
    install_openai(app)  # /v1/*, /chat_tokenize, the chat template, /invocations branches

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_alias() -> JSONResponse:
        return JSONResponse(app.openapi())

    _install_error_handlers(app)
    # innermost: over-cap requests are refused before their body is read, after the key check
    app.add_middleware(ShedMiddleware, service=service, retry_after=RETRY_AFTER_S)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(LifecycleMiddleware, lifecycle=lifecycle)
    app.add_middleware(RequestLimitsMiddleware, read_timeout=settings.request_read_timeout)
    # added last = outermost, so a 401 still carries the CORS headers
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(settings.cors_allow_origin) or ["*"],
        allow_methods=["GET", "POST"],
        allow_headers=["content-type"],
    )
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(InferError)
    async def infer_error(request: Request, exc: InferError) -> Response:
        # an overloaded server says when to come back (TGI sends no Retry-After)
        headers = {"Retry-After": RETRY_AFTER_S} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=499)  # left while sending its body; nobody reads this

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        body = {"error": "Internal server error", "error_type": "internal"}
        return JSONResponse(body, status_code=500)

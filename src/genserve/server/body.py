"""Reading a JSON body the way TGI's axum `Json` extractor does, with its statuses.

415 without `Content-Type: application/json`, 413 over the payload limit, 400 for malformed
JSON, 422 for JSON of the wrong shape. The messages are axum's; the body is TGI's error JSON.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import pydantic
from starlette.requests import Request

from genserve.server.errors import RequestBodyError

M = TypeVar("M", bound=pydantic.BaseModel)

TOO_LARGE = "Failed to buffer the request body: length limit exceeded"


def _is_json(content_type: str) -> bool:
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (
        mime.startswith("application/") and mime.endswith("+json")
    )


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise RequestBodyError(413, TOO_LARGE)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestBodyError(413, TOO_LARGE)
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # let later readers (and the disconnect watcher) see a consumed body
    return body


async def _read_json_bytes(request: Request, limit: int) -> bytes:
    if not _is_json(request.headers.get("content-type", "")):
        raise RequestBodyError(415, "Expected request with `Content-Type: application/json`")
    return await read_body(request, limit)


async def read_json(request: Request, model: type[M], limit: int) -> M:
    return parse_json(await _read_json_bytes(request, limit), model)


async def read_json_value(request: Request, limit: int) -> Any:
    """The body as plain JSON, for routes that dispatch on its shape (`/invocations`)."""
    body = await _read_json_bytes(request, limit)
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # too deep is malformed too
        raise RequestBodyError(400, f"Failed to parse the request body as JSON: {exc}") from None


def parse_json(body: bytes | str, model: type[M]) -> M:
    try:
        return model.model_validate_json(body)
    except pydantic.ValidationError as exc:
        raise body_error(exc) from None


def parse_obj(obj: Any, model: type[M]) -> M:
    """Same rules as for a body (JSON-mode strictness), for an already-parsed value."""
    return parse_json(json.dumps(obj), model)


def body_error(exc: pydantic.ValidationError) -> RequestBodyError:
    err = exc.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        detail = err.get("ctx", {}).get("error", err["msg"])
        return RequestBodyError(400, f"Failed to parse the request body as JSON: {detail}")
    loc = ".".join(str(p) for p in err["loc"])
    where = f"{loc}: " if loc else ""
    return RequestBodyError(
        422, f"Failed to deserialize the JSON body into the target type: {where}{err['msg']}"
    )

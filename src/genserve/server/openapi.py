"""Our OpenAPI document: TGI's request/response shapes, served at `/api-doc/openapi.json`.

Routes read their bodies themselves (to answer body errors the TGI way), so request bodies and
the protocol models are declared here by reference and added to the components.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from genserve.server import protocol
from genserve.server.settings import VERSION

REF = "#/components/schemas/{model}"
JSON = "application/json"

SCHEMA_MODELS = (
    protocol.GenerateRequest,
    protocol.CompatGenerateRequest,
    protocol.GenerateParameters,
    protocol.GrammarType,
    protocol.GenerateResponse,
    protocol.Details,
    protocol.BestOfSequence,
    protocol.StreamResponse,
    protocol.StreamDetails,
    protocol.Token,
    protocol.PrefillToken,
    protocol.SimpleToken,
    protocol.ErrorResponse,
    protocol.Info,
    protocol.VertexRequest,
    protocol.VertexResponse,
    protocol.GenerateVertexInstance,
)


def ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def body_ref(name: str) -> dict[str, Any]:
    content = {"application/json": {"schema": ref(name)}}
    return {"requestBody": {"content": content, "required": True}}


def json_ref(description: str, name: str, array: bool = False) -> dict[str, Any]:
    schema = {"type": "array", "items": ref(name)} if array else ref(name)
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _err(description: str, message: str, kind: str, *content_types: str) -> dict[str, Any]:
    example = {"error": message, "error_type": kind}
    media = {"schema": ref("ErrorResponse"), "example": example}
    return {"description": description, "content": {t: media for t in content_types}}


def _errors(*content_types: str) -> dict[int | str, dict[str, Any]]:
    return {
        422: _err("Input validation error", "Input validation error", "validation", *content_types),
        424: _err(
            "Generation Error", "Request failed during generation", "generation", *content_types
        ),
        429: _err("Model is overloaded", "Model is overloaded", "overloaded", *content_types),
        500: _err(
            "Incomplete generation",
            "Incomplete generation",
            "incomplete_generation",
            *content_types,
        ),
    }


# answered before any route logic runs (body.py, lifecycle.py), always as JSON
BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _err("Malformed JSON", "Failed to parse the request body as JSON", "validation", JSON),
    413: _err("Payload too large", "length limit exceeded", "validation", JSON),
    415: _err("Not JSON", "Expected `Content-Type: application/json`", "validation", JSON),
    503: _err("Shutting down", "the server is shutting down", "unavailable", JSON),
}
ERROR_RESPONSES = {**_errors(JSON), **BODY_ERRORS}


def sse_events(*names: str) -> dict[str, Any]:
    """One SSE event (OpenAPI 3.1 / JSON Schema 2020-12): its `data` is JSON of one of `names`."""
    payload = {"oneOf": [ref(n) for n in names]} if len(names) > 1 else ref(names[0])
    data = {"type": "string", "contentMediaType": JSON, "contentSchema": payload}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {"schema": event}


# a stream reports errors as SSE events over a 200 (TGI), so an event is either kind
SSE_EVENTS = sse_events("StreamResponse", "ErrorResponse")
STREAM_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Generated Text", "content": {"text/event-stream": SSE_EVENTS}},
    **_errors("text/event-stream", JSON),
    **BODY_ERRORS,
}


# a JSON body, or an SSE stream when the request asked for one (bodies not described here)
ANY_JSON_OR_SSE = {
    "description": "Generated",
    "content": {JSON: {"schema": {}}, "text/event-stream": {"schema": {}}},
}


def json_or_stream(description: str, name: str, array: bool = False) -> dict[str, Any]:
    """A 200 that is JSON, or an SSE stream when the request asked for one."""
    ok = json_ref(description, name, array)
    ok["content"]["text/event-stream"] = SSE_EVENTS
    return ok


def _mode(model: type) -> Any:
    return "validation" if issubclass(model, protocol._Request) else "serialization"


def build_openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(
        title="Text Generation Inference",
        version=VERSION,
        description="Text Generation Webserver (genserve)",
        routes=app.routes,
        license_info={"name": "Apache 2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"},
    )
    _, defs = models_json_schema([(m, _mode(m)) for m in SCHEMA_MODELS], ref_template=REF)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in defs.get("$defs", {}).items():
        schemas.setdefault(name, schema)
    schemas["TokenizeResponse"] = {"type": "array", "items": ref("SimpleToken")}
    app.openapi_schema = doc
    return doc

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


def _errors(content_type: str) -> dict[int | str, dict[str, Any]]:
    def err(description: str, message: str, kind: str) -> dict[str, Any]:
        example = {"error": message, "error_type": kind}
        media = {"schema": ref("ErrorResponse"), "example": example}
        return {"description": description, "content": {content_type: media}}

    return {
        422: err("Input validation error", "Input validation error", "validation"),
        424: err("Generation Error", "Request failed during generation", "generation"),
        429: err("Model is overloaded", "Model is overloaded", "overloaded"),
        500: err("Incomplete generation", "Incomplete generation", "incomplete_generation"),
    }


ERROR_RESPONSES = _errors("application/json")
STREAM_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Generated Text",
        "content": {"text/event-stream": {"schema": ref("StreamResponse")}},
    },
    **_errors("text/event-stream"),
}


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

"""Validate response bodies against the schemas of TGI's own OpenAPI document."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

OPENAPI = Path("/work/shared/reference/tgi-openapi.json")
if not OPENAPI.exists():  # the repo copy, if the shared one is not mounted
    OPENAPI = Path(__file__).resolve().parent / "tgi-openapi.json"


def _to_jsonschema(node: Any) -> Any:
    """OpenAPI 3.0 -> JSON Schema: `nullable: true` becomes a null alternative; string-typed
    examples/defaults are dropped (they are docs, not constraints)."""
    if isinstance(node, list):
        return [_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: _to_jsonschema(v)
        for k, v in node.items()
        if k not in ("example", "default", "discriminator")
    }
    if out.pop("nullable", False):
        return {"anyOf": [out, {"type": "null"}]}
    return out


@cache
def _components() -> dict[str, Any]:
    doc = json.loads(OPENAPI.read_text())
    return _to_jsonschema(doc["components"]["schemas"])


def schema_for(name: str, array: bool = False) -> dict[str, Any]:
    root: dict[str, Any] = {"$ref": f"#/components/schemas/{name}"}
    if array:
        root = {"type": "array", "items": root}
    return {**root, "components": {"schemas": copy.deepcopy(_components())}}


def validate(instance: Any, name: str, array: bool = False) -> None:
    jsonschema.validate(instance, schema_for(name, array))

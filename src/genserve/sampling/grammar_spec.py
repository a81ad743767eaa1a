"""What a grammar says, before compilation: `GrammarSpec`, and TGI's request form turned into one.

A spec is plain, hashable data: its (kind, value) is the compile-cache key. The request form is
TGI's `GrammarType` (`router/src/validation.rs`, step 15 of `Validation::validate`):

    {"type": "json" | "json_object", "value": schema}     schema: an object, or a JSON string
    {"type": "json_schema", "value": {"name"?, "schema", "strict"?}}    `strict` is ignored
    {"type": "regex", "value": "..."}                      the whole output must match

A JSON schema must pass the JSON-Schema draft 2020-12 meta-schema and have `properties`, with
TGI's messages. Chat-side grammars that TGI's request form cannot say (OpenAI's
`{"type": "json_object"}` = any JSON object, Lark grammars) are built with the constructors.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema


class GrammarError(ValueError):
    """A grammar that cannot be used; the message names the problem (TGI's text where it has one)."""


class GrammarKind(enum.StrEnum):
    JSON_SCHEMA = "json_schema"  # value: the schema as canonical JSON text
    JSON_OBJECT = "json_object"  # value: "" (any JSON object)
    REGEX = "regex"  # value: the pattern; the whole output must match it
    LARK = "lark"  # value: a Lark grammar (llguidance's dialect)


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    kind: GrammarKind
    value: str

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str) -> GrammarSpec:
        """No TGI checks here (see `from_tgi`): a tool-call schema goes straight in. Key order
        is kept: properties are generated in the schema's order."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise GrammarError(f"grammar is not valid: {exc}") from None
        return cls(GrammarKind.JSON_SCHEMA, json.dumps(schema, separators=(",", ":")))

    @classmethod
    def json_object(cls) -> GrammarSpec:
        return cls(GrammarKind.JSON_OBJECT, "")

    @classmethod
    def regex(cls, pattern: str) -> GrammarSpec:
        return cls(GrammarKind.REGEX, pattern)

    @classmethod
    def lark(cls, grammar: str) -> GrammarSpec:
        return cls(GrammarKind.LARK, grammar)


def from_tgi(kind: str, value: Any) -> GrammarSpec:
    """TGI's `GrammarType` (already shaped by the protocol model) -> spec, or GrammarError with
    TGI's message (without the `Input validation error: ` prefix)."""
    if kind == "regex":
        if not isinstance(value, str):
            raise GrammarError("grammar is not supported")
        return GrammarSpec.regex(value)
    if kind == "json_schema":
        if not isinstance(value, Mapping) or "schema" not in value:
            raise GrammarError("grammar is not supported")
        schema = value["schema"]  # TGI does not re-parse a string here
    elif kind in ("json", "json_object"):
        schema = _json_value(value)
    else:
        raise GrammarError("grammar is not supported")
    check_schema(schema)
    return GrammarSpec.json_schema(schema)


def _json_value(value: Any) -> Any:
    """A string is parsed again as JSON; anything else but an object is refused (TGI)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as exc:
            raise GrammarError(f"grammar is not valid: {exc}") from None
    if not isinstance(value, Mapping):
        raise GrammarError("grammar is not supported")
    return value


def check_schema(schema: Any) -> None:
    """The draft 2020-12 meta-schema, then `properties` (TGI: its Python side needed them)."""
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise GrammarError(f"grammar is not valid: {exc.message}") from None
    except RecursionError:
        raise GrammarError("grammar is not valid: the schema is nested too deeply") from None
    if not isinstance(schema, Mapping) or "properties" not in schema:
        raise GrammarError("grammar is not valid: Grammar must have a 'properties' field")

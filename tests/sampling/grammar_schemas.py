"""The JSON schemas (and regexes) that grammar tests and `bench/grammar.py` run.

Every free-form string is bounded (`maxLength`, a pattern, an enum or a format) so that a tiny
random-weight model, which almost never picks a closing quote by chance, still closes its JSON
within a few hundred tokens. `OPTIONAL_12` is the schema with twelve optional properties that
makes outlines-core's regex index slow (TGI issue #2902).
"""

from __future__ import annotations

from typing import Any

NAME = {"type": "string", "minLength": 1, "maxLength": 12}

OPTIONAL_12: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 100000},
        "name": NAME,
        "email": {"type": "string", "format": "email", "maxLength": 32},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "active": {"type": "boolean"},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "city": NAME,
        "country": {"type": "string", "pattern": "^[A-Z]{2}$"},
        "phone": {"type": "string", "pattern": "^\\+?[0-9]{6,12}$"},
        "tags": {"type": "array", "items": NAME, "maxItems": 3},
        "notes": {"type": ["string", "null"], "maxLength": 16},
    },
    "additionalProperties": False,
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "nested_object": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": NAME,
                    "address": {
                        "type": "object",
                        "properties": {
                            "city": NAME,
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                        },
                        "required": ["city", "zip"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "address"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    "array_min_max": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": NAME, "minItems": 2, "maxItems": 4}},
        "required": ["tags"],
        "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{3}$"},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    },
                    "required": ["sku", "qty"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["items"],
        "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {
            "status": {"enum": ["active", "inactive", "pending"]},
            "priority": {"enum": [1, 2, 3]},
            "color": {"type": "string", "enum": ["red", "green", "blue"]},
        },
        "required": ["status", "priority", "color"],
        "additionalProperties": False,
    },
    "any_of": {
        "type": "object",
        "properties": {
            "value": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 8}]},
            "maybe": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
        },
        "required": ["value", "maybe"],
        "additionalProperties": False,
    },
    "refs_defs": {
        "type": "object",
        "$defs": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -100, "maximum": 100},
                    "y": {"type": "integer", "minimum": -100, "maximum": 100},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
        "additionalProperties": False,
    },
    "number_bounds": {
        "type": "object",
        "properties": {
            "temperature": {"type": "number", "minimum": -50, "maximum": 50},
            "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "count": {"type": "integer", "minimum": 10, "maximum": 20},
        },
        "required": ["temperature", "ratio", "count"],
        "additionalProperties": False,
    },
    "string_pattern": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"},
        },
        "required": ["code", "hex"],
        "additionalProperties": False,
    },
    "string_formats": {
        "type": "object",
        "properties": {
            "day": {"type": "string", "format": "date"},
            "at": {"type": "string", "format": "time"},
            "id": {"type": "string", "format": "uuid"},
        },
        "required": ["day", "at", "id"],
        "additionalProperties": False,
    },
    "optional_12": OPTIONAL_12,
    "booleans_nulls": {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "nothing": {"type": "null"}},
        "required": ["ok", "nothing"],
        "additionalProperties": False,
    },
    "const": {
        "type": "object",
        "properties": {"version": {"const": "1.0"}, "kind": {"const": 7}, "name": NAME},
        "required": ["version", "kind", "name"],
        "additionalProperties": False,
    },
    "string_lengths": {
        "type": "object",
        "properties": {
            "short": {"type": "string", "minLength": 2, "maxLength": 4},
            "word": {"type": "string", "pattern": "^[a-z]{3,6}$"},
        },
        "required": ["short", "word"],
        "additionalProperties": False,
    },
    "deep_nesting": {
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "properties": {
                    "b": {
                        "type": "object",
                        "properties": {
                            "c": {
                                "type": "object",
                                "properties": {"d": {"type": "integer", "maximum": 9}},
                                "required": ["d"],
                                "additionalProperties": False,
                            }
                        },
                        "required": ["c"],
                        "additionalProperties": False,
                    }
                },
                "required": ["b"],
                "additionalProperties": False,
            }
        },
        "required": ["a"],
        "additionalProperties": False,
    },
    "tuple_prefix_items": {
        "type": "object",
        "properties": {
            "pair": {
                "type": "array",
                "prefixItems": [{"type": "integer", "maximum": 999}, {"type": "boolean"}],
                "items": False,
                "minItems": 2,
            }
        },
        "required": ["pair"],
        "additionalProperties": False,
    },
    "all_of": {
        "type": "object",
        "properties": {
            "item": {
                "allOf": [
                    {
                        "type": "object",
                        "properties": {"id": {"type": "integer", "minimum": 1}},
                        "additionalProperties": False,
                    },
                    {"required": ["id"]},
                ],
            }
        },
        "required": ["item"],
        "additionalProperties": False,
    },
    "enum_array": {
        "type": "object",
        "properties": {
            "days": {
                "type": "array",
                "items": {"enum": ["mon", "tue", "wed", "thu", "fri"]},
                "minItems": 1,
                "maxItems": 5,
            }
        },
        "required": ["days"],
        "additionalProperties": False,
    },
    "tool_call": {  # the shape a chat tool call is constrained to (TGI's tool grammar)
        "type": "object",
        "$functions": {
            "get_weather": {
                "type": "object",
                "properties": {
                    "_name": {"type": "string", "const": "get_weather"},
                    "location": NAME,
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["_name", "location", "unit"],
                "additionalProperties": False,
            }
        },
        "properties": {"function": {"anyOf": [{"$ref": "#/$functions/get_weather"}]}},
        "required": ["function"],
        "additionalProperties": False,
    },
    "optional_mixed": {
        "type": "object",
        "properties": {
            "title": NAME,
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            "rating": {"type": "number", "minimum": 0, "maximum": 10},
            "genres": {"type": "array", "items": NAME, "maxItems": 2},
        },
        "required": ["title"],
        "additionalProperties": False,
    },
}

REGEXES: dict[str, str] = {
    "phone": r"\(\d{3}\) \d{3}-\d{4}",
    "ipv4": r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)",
    "date": r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
    "yes_no": r"(yes|no)",
    "word_list": r"[a-z]{1,8}(, [a-z]{1,8}){0,3}",
}

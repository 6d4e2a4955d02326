"""JSON schemas that structured output must satisfy, each with the request that asks for it:
nesting, enums, arrays, required and optional fields, string patterns, numbers in a range.
Used by tests/test_structured_output.py and benchmarks/structured_output.py."""

from __future__ import annotations

from typing import Any

SCHEMAS: dict[str, tuple[str, dict[str, Any]]] = {
    "nested": (
        "Give a person with a name and an address (street and city) as JSON.",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 20},
                "address": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string", "maxLength": 30},
                        "city": {"type": "string", "maxLength": 20},
                    },
                    "required": ["street", "city"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "address"],
            "additionalProperties": False,
        },
    ),
    "enums": (
        "Pick a colour and a size for a T-shirt, as JSON.",
        {
            "type": "object",
            "properties": {"colour": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["S", "M", "L", "XL"]}},
            "required": ["colour", "size"],
            "additionalProperties": False,
        },
    ),
    "array": (
        "List up to three fruits as JSON.",
        {
            "type": "object",
            "properties": {
                "fruits": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3}
            },
            "required": ["fruits"],
            "additionalProperties": False,
        },
    ),
    "pattern": (
        "Give a flight code and its date as JSON.",
        {
            "type": "object",
            "properties": {
                "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
                "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
            },
            "required": ["code", "date"],
            "additionalProperties": False,
        },
    ),
    "optional": (
        "Describe a book as JSON: title, and a year if you know it.",
        {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 30},
                "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
                "in_print": {"type": "boolean"},
            },
            "required": ["title", "in_print"],
            "additionalProperties": False,
        },
    ),
    "objects_in_array": (
        "List two cities with their population as JSON.",
        {
            "type": "object",
            "properties": {
                "cities": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "maxLength": 15},
                            "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
                        },
                        "required": ["name", "population"],
                        "additionalProperties": False,
                    },
                    "minItems": 1,
                    "maxItems": 2,
                }
            },
            "required": ["cities"],
            "additionalProperties": False,
        },
    ),
}

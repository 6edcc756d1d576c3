"""JSON Schemas the compiler and runtime check values against (structured outputs, tool
params): checked and turned into validators once per distinct schema (pipelines repeat the
same few), keyed by the schema's JSON text. jsonschema is imported only where a schema is."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from typing import Any


def schema_key(schema: Any) -> str:
    """The cache key of a schema: its JSON text, keys sorted."""
    return json.dumps(schema, sort_keys=True, default=str)


def json_path(parts: Iterable[Any]) -> str:
    """A value's place, written as a reader would: ``.items[0].name``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


@functools.lru_cache(maxsize=256)
def schema_problem(schema_json: str) -> str | None:
    """Why a schema (as its `schema_key`) is not valid JSON Schema, or None."""
    import jsonschema

    schema = json.loads(schema_json)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        return f"not a valid JSON Schema: schema{json_path(exc.absolute_path)}: {exc.message}"
    return None


@functools.lru_cache(maxsize=256)
def schema_validator(schema_json: str) -> Any | None:
    """A validator for a schema (as its `schema_key`); None when it is not valid JSON
    Schema."""
    if schema_problem(schema_json) is not None:
        return None
    import jsonschema

    schema = json.loads(schema_json)
    return jsonschema.validators.validator_for(schema)(schema)

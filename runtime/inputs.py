"""Checking a run's inputs against the pipeline's `inputs:` before anything runs."""

from __future__ import annotations

import json
from typing import Any

from flowc.cost import input_too_long
from flowc.model import InputSpec
from flowc.schemas import json_path, schema_key, schema_validator

_PY = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
       "object": (dict,), "array": (list,)}


class InputError(ValueError):
    """The inputs do not fit the pipeline; ``problems`` lists each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _fits(value: Any, kind: str) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _PY[kind])


def check_inputs(specs: dict[str, InputSpec] | None, given: dict[str, Any]) -> dict[str, Any]:
    """The inputs with defaults applied; raises :class:`InputError`. Without `inputs:`,
    anything is accepted as given."""
    if specs is None:
        return dict(given)
    problems = []
    out: dict[str, Any] = {}
    for name in given:
        if name not in specs:
            problems.append(f"unknown input '{name}' (declared: {', '.join(specs) or 'none'})")
    for name, spec in specs.items():
        if name in given:
            value = given[name]
            if not _fits(value, spec.type):
                problems.append(f"input '{name}' must be {spec.type}, not "
                                f"{type(value).__name__} {json.dumps(value, default=str)}")
            else:
                problems += _schema_problems(name, spec, value)
            out[name] = value
        elif spec.default is not None:
            out[name] = spec.default
        elif spec.is_required:
            problems.append(f"missing required input '{name}' ({spec.type})")
    problems += input_too_long(specs, given)  # the bound a worst-case cost assumed
    if problems:
        raise InputError(problems)
    return out


def _schema_problems(name: str, spec: InputSpec, value: Any) -> list[str]:
    """Where a value breaks its input's `items`, `properties`, `enum` or `min_items` (the
    compiler typed every read of its elements and fields by them)."""
    if spec.items is None and spec.properties is None and spec.enum is None \
            and spec.min_items is None:
        return []
    validator = schema_validator(schema_key(spec.json_schema()))
    if validator is None:  # the compiler refused such a schema
        return [f"input '{name}' has an invalid schema"]
    errors = sorted(validator.iter_errors(value), key=lambda e: list(map(str, e.absolute_path)))
    return [f"input '{name}{json_path(e.absolute_path)}': {e.message}"[:300]
            for e in errors[:3]]


def parse_cli_inputs(pairs: tuple[str, ...], specs: dict[str, InputSpec] | None
                     ) -> dict[str, Any]:
    """`--input k=v` pairs; values are read as the declared type (JSON for non-strings)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise InputError([f"--input needs key=value, not {pair!r}"])
        kind = specs[key].type if specs and key in specs else None
        if kind == "string" or (kind is None and not _looks_json(raw)):
            out[key] = raw
            continue
        try:
            out[key] = json.loads(raw)
        except ValueError:
            if kind is None:
                out[key] = raw
            else:
                raise InputError([f"input '{key}' must be {kind}: {raw!r} is not"]) from None
    return out


def _looks_json(raw: str) -> bool:
    return raw[:1] in "[{\"" or raw in ("true", "false", "null") or raw.lstrip("-")[:1].isdigit()

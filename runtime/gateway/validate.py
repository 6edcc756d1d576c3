"""Cheap checks at the edge: a standard field of the wrong type or out of range is the
client's 400, worded as its provider words it, before any upstream is called (and before a
same-wire request is forwarded verbatim). Fields not listed pass untouched: checking them is
the provider's job, and a newer field must not be refused for being new.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runtime.providers import RequestError

# Wires: chat (OpenAI chat completions), responses (OpenAI responses), embeddings (OpenAI),
# messages (Anthropic).
_NAMES = {"number": "a decimal", "integer": "an integer", "boolean": "a boolean",
          "string": "a string", "array": "an array", "object": "an object"}
_ANTHROPIC_NAMES = {"number": "a valid number", "integer": "a valid integer",
                    "boolean": "a valid boolean", "string": "a valid string",
                    "array": "a valid list", "object": "a valid dictionary"}


def _is(kind: str, value: Any) -> bool:
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    if kind == "array":
        return isinstance(value, list)
    return isinstance(value, dict)


def _got(value: Any) -> str:
    for kind in ("boolean", "integer", "number", "string", "array", "object"):
        if _is(kind, value):
            return _NAMES[kind]
    return "null" if value is None else type(value).__name__


@dataclass(frozen=True)
class Field:
    kinds: tuple[str, ...]
    low: float | None = None
    high: float | None = None
    required: bool = False


def F(*kinds: str, low: float | None = None, high: float | None = None,
      required: bool = False) -> Field:
    return Field(kinds, low, high, required)


_COMMON_OPENAI = {
    "model": F("string", required=True), "stream": F("boolean"),
    "temperature": F("number", low=0, high=2), "top_p": F("number", low=0, high=1),
    "tools": F("array"), "parallel_tool_calls": F("boolean"), "user": F("string"),
    "metadata": F("object"), "store": F("boolean"),
}
WIRES: dict[str, dict[str, Field]] = {
    "chat": {**_COMMON_OPENAI,
             "messages": F("array", required=True),
             "max_tokens": F("integer", low=1), "max_completion_tokens": F("integer", low=1),
             "n": F("integer", low=1, high=128), "seed": F("integer"),
             "presence_penalty": F("number", low=-2, high=2),
             "frequency_penalty": F("number", low=-2, high=2),
             "stop": F("string", "array"), "logprobs": F("boolean"),
             "top_logprobs": F("integer", low=0, high=20), "response_format": F("object"),
             "stream_options": F("object"), "reasoning_effort": F("string"),
             "tool_choice": F("string", "object")},
    "responses": {**_COMMON_OPENAI,
                  "input": F("string", "array"), "instructions": F("string"),
                  "max_output_tokens": F("integer", low=1), "previous_response_id":
                  F("string"), "reasoning": F("object"), "text": F("object"),
                  "include": F("array"), "tool_choice": F("string", "object"),
                  "top_logprobs": F("integer", low=0, high=20)},
    "embeddings": {"model": F("string", required=True),
                   "input": F("string", "array", required=True),
                   "dimensions": F("integer", low=1), "encoding_format": F("string"),
                   "user": F("string")},
    "messages": {"model": F("string", required=True), "messages": F("array", required=True),
                 "max_tokens": F("integer", low=1, required=True), "stream": F("boolean"),
                 "system": F("string", "array"), "temperature": F("number", low=0, high=1),
                 "top_p": F("number", low=0, high=1), "top_k": F("integer", low=0),
                 "stop_sequences": F("array"), "tools": F("array"),
                 "tool_choice": F("object"), "metadata": F("object"),
                 "thinking": F("object"), "output_config": F("object")},
    "count_tokens": {"model": F("string", required=True),
                     "messages": F("array", required=True), "system": F("string", "array"),
                     "tools": F("array"), "thinking": F("object")},
}


def _openai_error(name: str, problem: str, code: str) -> RequestError:
    if code == "missing_required_parameter":
        return RequestError(f"Missing required parameter: '{name}'.", param=name, code=code)
    if code == "invalid_type":
        return RequestError(f"Invalid type for '{name}': {problem}", param=name, code=code)
    return RequestError(f"Invalid '{name}': {problem}", param=name, code=code)


def _anthropic_error(name: str, problem: str, code: str) -> RequestError:
    return RequestError(f"{name}: {problem}", param=name, code=code)


# Per wire: its fields, and those required (checked first, in this order).
_REQUIRED = {wire: tuple(n for n, f in fields.items() if f.required)
             for wire, fields in WIRES.items()}


def check(wire: str, body: dict[str, Any]) -> None:
    """Raise the client's 400 for the first standard field of ``body`` that is missing,
    of the wrong type or out of range. Only the fields the body has are looked at (a
    request holds a few of the two dozen a wire knows: this runs on every request)."""
    fields = WIRES[wire]
    for name in _REQUIRED[wire]:
        if body.get(name) is None:
            _refuse(wire, name, fields[name], None)
    for name, value in body.items():
        spec = fields.get(name)
        if spec is None or value is None:
            continue
        for k in spec.kinds:
            if _is(k, value):
                break
        else:
            _refuse(wire, name, spec, value)
        if (spec.low is None and spec.high is None) or not _is("number", value):
            continue
        if (spec.low is not None and value < spec.low) or \
                (spec.high is not None and value > spec.high):
            _refuse(wire, name, spec, value)


def _refuse(wire: str, name: str, spec: Field, value: Any) -> None:
    """Raise the 400 for ``name``'s ``value`` (None: missing), worded by ``wire``."""
    anthropic = wire in ("messages", "count_tokens")
    make: Callable[[str, str, str], RequestError] = (_anthropic_error if anthropic
                                                     else _openai_error)
    names = _ANTHROPIC_NAMES if anthropic else _NAMES
    if value is None:
        raise make(name, "Field required", "missing_required_parameter")
    if not any(_is(k, value) for k in spec.kinds):
        wanted = " or ".join(names[k] for k in spec.kinds)
        problem = (f"Input should be {wanted}" if anthropic else
                   f"expected {wanted}, but got {_got(value)} instead.")
        raise make(name, problem, "invalid_type")
    kind = "integer" if isinstance(value, int) else "decimal"
    if spec.low is not None and value < spec.low:
        raise make(name, f"Input should be greater than or equal to {spec.low:g}"
                   if anthropic else f"{kind} below minimum value. Expected a value >= "
                   f"{spec.low:g}, but got {value} instead.", f"{kind}_below_min_value")
    raise make(name, f"Input should be less than or equal to {spec.high:g}"
               if anthropic else f"{kind} above maximum value. Expected a value <= "
               f"{spec.high:g}, but got {value} instead.", f"{kind}_above_max_value")

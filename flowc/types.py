"""Static types of pipeline values, derived from input declarations and JSON Schemas."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KINDS = ("string", "integer", "number", "boolean", "object", "array", "null", "any")


@dataclass(frozen=True)
class Type:
    """``kind`` is a JSON Schema type or ``any``. Objects may know their ``fields`` (then a
    path to any other field is an error); arrays may know their ``items``; a scalar from a
    schema's ``enum`` knows its ``values`` (a detail: types still compare by shape)."""

    kind: str
    fields: tuple[tuple[str, Type], ...] | None = None
    items: Type | None = None
    values: tuple[Any, ...] | None = field(default=None, compare=False)
    optional: frozenset[str] = field(default=frozenset(), compare=False)  # not `required`
    min_items: int = field(default=0, compare=False)  # an array's schema's `minItems`
    # For ``any`` that is one of known kinds (``a ?? b`` of a string and an object): which.
    kinds: frozenset[str] | None = field(default=None, compare=False)

    def field(self, name: str) -> Type | None:
        for key, t in self.fields or ():
            if key == name:
                return t
        return None

    @property
    def field_names(self) -> list[str]:
        return [k for k, _ in self.fields or ()]

    @property
    def is_numeric(self) -> bool:
        return self.kind in ("integer", "number")

    def __str__(self) -> str:
        if self.kind == "array" and self.items and self.items.kind != "any":
            return f"array of {self.items}"
        if self.kinds:
            return " or ".join(sorted(self.kinds))
        return self.kind


ANY = Type("any")
STRING = Type("string")
INTEGER = Type("integer")
NUMBER = Type("number")
BOOLEAN = Type("boolean")
NULL = Type("null")
OBJECT = Type("object")
# In an array's ``optional``: its items may be missing (a `for_each` item that was skipped or
# failed is null), so `${list[0]}` needs a fallback.
ITEM_MAY_BE_MISSING = "[]"


def from_json_schema(schema: Any, _depth: int = 0) -> Type:
    """A best-effort static type for a JSON Schema; anything we cannot pin down is ``any``."""
    if not isinstance(schema, dict) or _depth > 32:
        return ANY
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"] -> string (nullable is a runtime matter)
        non_null = [k for k in kind if k != "null"]
        kind = non_null[0] if len(non_null) == 1 else None
    if kind is None and "enum" in schema and schema["enum"]:
        kinds = {_kind_of_value(v) for v in schema["enum"]}
        kind = kinds.pop() if len(kinds) == 1 else None
    if kind is None and "properties" in schema:
        kind = "object"
    if kind == "object":
        props = schema.get("properties")
        if isinstance(props, dict):
            required = schema.get("required")
            required = set(map(str, required)) if isinstance(required, list) else set()
            return Type("object", fields=tuple(
                (str(k), from_json_schema(v, _depth + 1)) for k, v in props.items()),
                optional=frozenset(str(k) for k, v in props.items()
                                   if str(k) not in required or nullable(v)))
        return OBJECT
    if kind == "array":
        least = schema.get("minItems")
        return Type("array", items=from_json_schema(schema.get("items"), _depth + 1),
                    optional=frozenset({ITEM_MAY_BE_MISSING}) if nullable(schema.get("items"))
                    else frozenset(),
                    min_items=least if isinstance(least, int) and not isinstance(least, bool)
                    else 0)
    if kind in KINDS:
        enum = schema.get("enum")
        values = tuple(enum) if isinstance(enum, list) and enum and all(
            isinstance(v, str | int | float | bool) or v is None for v in enum) else None
        return Type(kind, values=values)
    return ANY


# The MCP SDKs send a tool's plain return value (a string, a number, a list) as structured
# content wrapped in an object with the single field `result`, and declare that wrapper as
# the tool's output schema. flowc treats such a tool as returning the value itself, at
# compile time (its type) and at run time (its value), so `${search}` is the search text.
WRAPPED_RESULT = "result"


def is_wrapped_result(value: Any) -> bool:
    """Whether a tool's structured content (or output schema's properties) is the wrapper."""
    return isinstance(value, dict) and list(value) == [WRAPPED_RESULT]


def of_tool_output(schema: Any) -> Type:
    """The static type of an MCP tool's result, from its output schema (None: its text)."""
    if not schema:
        return STRING
    props = schema.get("properties") if isinstance(schema, dict) else None
    if is_wrapped_result(props):
        return from_json_schema(props[WRAPPED_RESULT])
    return from_json_schema(schema)


def nullable(schema: Any) -> bool:
    """Whether a schema admits JSON null (which reads as missing: see `resolve_path`)."""
    if not isinstance(schema, dict):
        return False
    kind = schema.get("type")
    if kind == "null" or (isinstance(kind, list) and "null" in kind):
        return True
    if schema.get("nullable") is True:
        return True
    enum = schema.get("enum")
    if isinstance(enum, list) and None in enum:
        return True
    return any(nullable(s) for key in ("anyOf", "oneOf")
               for s in (schema.get(key) if isinstance(schema.get(key), list) else ()))


def _kind_of_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def of_value(value: Any) -> Type:
    """The type of a literal value."""
    return Type(_kind_of_value(value))


def join(types: list[Type]) -> Type:
    """The type of a value that is one of ``types`` (``a ?? b``)."""
    known = [t for t in types if t.kind != "null"]
    if not known:
        return NULL
    first = known[0]
    if first.kind == "any":
        return _one_of(known)
    if all(t == first for t in known):
        if any(t.values != first.values for t in known):  # either side's values may come
            values = None if any(t.values is None for t in known) else tuple(
                dict.fromkeys(v for t in known for v in t.values or ()))
            return Type(first.kind, first.fields, first.items, values,
                        frozenset().union(*(t.optional for t in known)))
        if any(t.optional != first.optional for t in known):
            return Type(first.kind, first.fields, first.items, first.values,
                        frozenset().union(*(t.optional for t in known)))
        return first
    if all(t.is_numeric for t in known):
        return NUMBER
    return _one_of(known)


def _one_of(known: list[Type]) -> Type:
    """``any``, knowing which kinds it may be when every side's kind is known: a function
    that takes a string can then refuse a value that may be an object."""
    kinds: set[str] = set()
    for t in known:
        if t.kind != "any":
            kinds.add(t.kind)
        elif t.kinds is None:
            return ANY
        else:
            kinds |= t.kinds
    return Type("any", kinds=frozenset(kinds))


def optional_field(t: Type, segments: tuple[str | int, ...]) -> str | None:
    """The first field along ``segments`` that the schema does not require, if any."""
    found = missing_part(t, segments)
    return None if found is None else found[0]


def missing_part(t: Type, segments: tuple[str | int, ...], known: dict[int, int] | None = None
                 ) -> tuple[str, str, int] | None:
    """The first part along ``segments`` that may be absent, why, and its position: why is
    ``field`` (not `required`, or nullable), ``item`` (an item that may be null: a map's
    skipped or failed item) or ``short`` (an index into an array that its schema lets be
    shorter: no `minItems` that covers it). ``known``: the least length of the list at a
    position that something else proves (a `when:` on its length)."""
    for at, seg in enumerate(segments):
        if isinstance(seg, int):
            if ITEM_MAY_BE_MISSING in t.optional:
                return f"[{seg}]", "item", at
            least = max(t.min_items, (known or {}).get(at, 0))
            if t.kind == "array" and (seg + 1 if seg >= 0 else -seg) > least:
                return f"[{seg}]", "short", at
            t = t.items or ANY
            continue
        if seg in t.optional:
            return seg, "field", at
        t = t.field(seg) or ANY
    return None


def comparable(a: Type, b: Type, op: str) -> bool:
    """Whether ``a op b`` can ever be meaningful."""
    if a.kind == "any" or b.kind == "any":
        return True
    if op in ("==", "!="):
        if a.kind == "null" or b.kind == "null":
            return True
        return a.kind == b.kind or (a.is_numeric and b.is_numeric)
    # ordering
    return (a.is_numeric and b.is_numeric) or (a.kind == b.kind == "string")


def contains_ok(item: Type, container: Type) -> bool:
    """Whether ``item in container`` can be meaningful."""
    if container.kind == "any":
        return True
    if container.kind == "string":
        return item.kind in ("string", "any")
    if container.kind == "object":
        return item.kind in ("string", "any")
    if container.kind == "array":
        el = container.items or ANY
        return comparable(item, el, "==")
    return False

"""Pure functions of the expression language beyond the condition basics: string, list,
dict, math and JSON. Each checks its arguments' kinds at run time (a value typed `any` is
only known then) and bounds what it builds, so a transform cannot blow up memory."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from flowc import types as T
from flowc.expr import EvalError, Function, Literal, Node, _equal, _kind

MAX_RESULT = 1_000_000  # characters or items one call may build


def _need(name: str, value: Any, *kinds: type, what: str) -> None:
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds
                                        and int in kinds):
        raise EvalError(f"{name}() needs {what}, not {_kind(value)}")


def _bounded(name: str, value: Any) -> Any:
    if len(value) > MAX_RESULT:
        raise EvalError(f"{name}() would build {len(value):,} characters or items "
                        f"(at most {MAX_RESULT:,})")
    return value


def _split(s: Any, sep: Any) -> list[str]:
    _need("split", s, str, what="a string")
    _need("split", sep, str, what="a string separator")
    if sep == "":
        raise EvalError("split() needs a non-empty separator")
    return s.split(sep)


def _join(items: Any, sep: Any) -> str:
    _need("join", items, list, what="an array")
    _need("join", sep, str, what="a string separator")
    for x in items:
        if not isinstance(x, str | int | float) or isinstance(x, bool):
            raise EvalError(f"join() needs an array of strings or numbers, not one with "
                            f"{_kind(x)}")
    total = sum(len(str(x)) for x in items) + len(sep) * max(0, len(items) - 1)
    if total > MAX_RESULT:
        raise EvalError(f"join() would build {total:,} characters (at most {MAX_RESULT:,})")
    return sep.join(str(x) for x in items)


def _replace(s: Any, old: Any, new: Any) -> str:
    for v in (s, old, new):
        _need("replace", v, str, what="strings")
    if old == "":
        raise EvalError("replace() needs a non-empty string to replace")
    if len(new) > len(old) and s.count(old) * (len(new) - len(old)) + len(s) > MAX_RESULT:
        raise EvalError(f"replace() would build more than {MAX_RESULT:,} characters")
    return s.replace(old, new)


def _slice(x: Any, start: Any, end: Any = None) -> Any:
    _need("slice", x, str, list, what="a string or an array")
    _need("slice", start, int, what="an integer start")
    if end is not None:
        _need("slice", end, int, what="an integer end")
    return x[start:end]


def _keys(d: Any) -> list[str]:
    _need("keys", d, dict, what="an object")
    return list(d)


def _values(d: Any) -> list[Any]:
    _need("values", d, dict, what="an object")
    return list(d.values())


def _get(d: Any, key: Any, default: Any = None) -> Any:
    if isinstance(d, dict):
        _need("get", key, str, what="a string key for an object")
        value = d.get(key)
    elif isinstance(d, list):
        _need("get", key, int, what="an integer index for an array")
        value = d[key] if -len(d) <= key < len(d) else None
    else:
        raise EvalError(f"get() needs an object or an array, not {_kind(d)}")
    return default if value is None else value


def _merge(a: Any, b: Any) -> dict[str, Any]:
    _need("merge", a, dict, what="objects")
    _need("merge", b, dict, what="objects")
    return {**a, **b}


def _numbers(name: str, items: Any) -> list[int | float]:
    _need(name, items, list, what="an array of numbers")
    for x in items:
        if not isinstance(x, int | float) or isinstance(x, bool):
            raise EvalError(f"{name}() needs an array of numbers, not one with {_kind(x)}")
    return items


def _sum(items: Any) -> int | float:
    return sum(_numbers("sum", items))


def _extreme(name: str, pick: Callable[..., Any]) -> Callable[[Any], Any]:
    def call(items: Any) -> Any:
        _need(name, items, list, what="an array")
        if not items:  # no value, as get() of an absent index: the compiler knows
            return None
        if all(isinstance(x, str) for x in items):
            return pick(items)
        return pick(_numbers(name, items))
    return call


def _round(x: Any, digits: Any = None) -> int | float:
    _need("round", x, int, float, what="a number")
    if digits is None:
        if isinstance(x, float) and not math.isfinite(x):
            raise EvalError("round() of a number that is not finite")
        return round(x)
    _need("round", digits, int, what="an integer number of digits")
    return round(float(x), max(-20, min(20, digits)))


def _to_json(x: Any) -> str:
    return _bounded("to_json", json.dumps(x, ensure_ascii=False, sort_keys=True))


def _from_json(s: Any) -> Any:
    _need("from_json", s, str, what="a string")
    try:
        return json.loads(s)
    except ValueError as exc:
        raise EvalError(f"from_json() could not parse its string: {exc}") from None
    except RecursionError:
        raise EvalError("from_json() got JSON nested too deeply") from None


def _default(value: Any, fallback: Any) -> Any:
    return fallback if value is None or value == "" or value == [] or value == {} else value


def _pluck(items: Any, key: Any) -> list[Any]:
    _need("pluck", items, list, what="an array of objects")
    _need("pluck", key, str, what="a string field name")
    for x in items:
        if not isinstance(x, dict):
            raise EvalError(f"pluck() needs an array of objects, not one with {_kind(x)}")
    return [x[key] for x in items if x.get(key) is not None]  # typed: no nulls


def _position(items: Any, item: Any) -> int:
    _need("index_of", items, list, what="an array")
    return next((i for i, x in enumerate(items) if _equal(x, item)), -1)


# -- result types ------------------------------------------------------------------------------
def _same_as_first(types: list[T.Type], _: tuple[Node, ...]) -> T.Type:
    return types[0]


def _element(types: list[T.Type], _: tuple[Node, ...]) -> T.Type:
    return types[0].items or T.ANY if types[0].kind == "array" else T.ANY


def _values_type(types: list[T.Type], _: tuple[Node, ...]) -> T.Type:
    fields = [t for _, t in types[0].fields or ()]
    return T.Type("array", items=T.join(fields) if fields else T.ANY)


def _pluck_type(types: list[T.Type], args: tuple[Node, ...]) -> T.Type:
    items, key = types[0].items or T.ANY, args[1]
    if isinstance(key, Literal) and isinstance(key.value, str):
        return T.Type("array", items=items.field(key.value) or T.ANY)
    return T.Type("array", items=T.ANY)


def _get_type(types: list[T.Type], args: tuple[Node, ...]) -> T.Type:
    container, key = types[0], args[1]
    found = T.ANY
    if container.kind == "array":
        found = container.items or T.ANY
    elif isinstance(key, Literal) and isinstance(key.value, str):
        found = container.field(key.value) or T.ANY
    return T.join([found, types[2]]) if len(types) > 2 else found


def _merge_type(types: list[T.Type], _: tuple[Node, ...]) -> T.Type:
    a, b = types
    if a.fields is None or b.fields is None:
        return T.OBJECT
    fields = dict(a.fields)
    fields.update(dict(b.fields))
    return T.Type("object", fields=tuple(fields.items()),
                  optional=frozenset((a.optional - set(b.field_names)) | b.optional))


def _sum_type(types: list[T.Type], _: tuple[Node, ...]) -> T.Type:
    return T.INTEGER if types[0].items is not None and types[0].items.kind == "integer" \
        else T.NUMBER


def _round_type(types: list[T.Type], args: tuple[Node, ...]) -> T.Type:
    return T.INTEGER if len(args) == 1 else T.NUMBER


def _default_type(types: list[T.Type], _: tuple[Node, ...]) -> T.Type:
    return T.join(types)


ARRAY_OF_STRINGS = T.Type("array", items=T.STRING)
_SCALARS = "string|integer|number"
PURE_FUNCTIONS: dict[str, Function] = {
    # strings
    "split": Function(("string", "string"), ARRAY_OF_STRINGS, _split),
    "join": Function(("array", "string"), T.STRING, _join, item_kinds=_SCALARS),
    "replace": Function(("string", "string", "string"), T.STRING, _replace),
    # strings and lists
    "len": Function(("string|array|object",), T.INTEGER, lambda x: _len(x)),
    "slice": Function(("string|array", "integer", "integer"), T.ANY, _slice, optional=1,
                      infer=_same_as_first),
    "pluck": Function(("array", "string"), T.Type("array", items=T.ANY), _pluck,
                      infer=_pluck_type, item_kinds="object"),
    "index_of": Function(("array", "any"), T.INTEGER, _position),
    # dicts
    "keys": Function(("object",), ARRAY_OF_STRINGS, _keys),
    "values": Function(("object",), T.Type("array", items=T.ANY), _values,
                       infer=_values_type),
    "get": Function(("object|array", "string|integer", "any"), T.ANY, _get, optional=1,
                    infer=_get_type),
    "merge": Function(("object", "object"), T.OBJECT, _merge, infer=_merge_type),
    # math
    "sum": Function(("array",), T.NUMBER, _sum, infer=_sum_type, item_kinds="integer|number"),
    "min": Function(("array",), T.ANY, _extreme("min", min), infer=_element,
                    item_kinds=_SCALARS),
    "max": Function(("array",), T.ANY, _extreme("max", max), infer=_element,
                    item_kinds=_SCALARS),
    "round": Function(("integer|number", "integer"), T.NUMBER, _round, optional=1,
                      infer=_round_type),
    # JSON
    "to_json": Function(("any",), T.STRING, _to_json),
    "from_json": Function(("string",), T.ANY, _from_json),
    # values
    "default": Function(("any", "any"), T.ANY, _default, infer=_default_type),
}


def _len(x: Any) -> int:
    if isinstance(x, str | list | dict):
        return len(x)
    raise EvalError(f"len() needs a string, array or object, not {_kind(x)}")


def may_be_null(node: Node) -> bool:
    """Whether an expression may have no value: `null`, `get()` of an absent key or index
    without a default, `min`/`max` of an empty array, `from_json` of "null"."""
    from flowc.expr import Call

    if isinstance(node, Literal):
        return node.value is None
    if not isinstance(node, Call):
        return False
    if node.name == "get":
        return len(node.args) < 3 or may_be_null(node.args[2])
    if node.name == "default" and len(node.args) == 2:
        return may_be_null(node.args[1])
    return node.name in ("from_json", "min", "max")

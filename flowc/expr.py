"""The expression language: `${...}` references and `when:` conditions.

One LALR grammar (lark) parses both. Conditions are evaluated by walking the AST with a
fixed set of operators and pure functions: user text is never handed to Python's `eval`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from flowc import types as T

_GRAMMAR = r"""
?start: expr
?expr: and_expr | expr "or" and_expr -> or_
?and_expr: not_expr | and_expr "and" not_expr -> and_
?not_expr: "not" not_expr -> not_ | comparison
?comparison: atom
    | atom COMP atom -> compare
    | atom "in" atom -> in_
    | atom "not" "in" atom -> not_in
?atom: ref
    | literal
    | NAME "(" [expr ("," expr)*] ")" -> call
    | NAME -> bare_name
    | "(" expr ")"
    | "[" [expr ("," expr)*] "]" -> list_
ref: "${" coalesce "}"
coalesce: alt ("??" alt)*
?alt: path | literal
path: NAME segment*
?segment: "." NAME -> field_
    | "[" INT "]" -> index
    | "[" STRING "]" -> key
?literal: STRING -> string
    | NUMBER -> number
    | "true" -> true
    | "false" -> false
    | "null" -> null
COMP: "==" | "!=" | "<=" | ">=" | "<" | ">"
NAME: /[A-Za-z_][A-Za-z0-9_-]*/
INT: /-?[0-9]+/
NUMBER: /-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?/
STRING: /"(\\.|[^"\\])*"/ | /'(\\.|[^'\\])*'/
%ignore /[ \t\r\n]+/
"""

_KEYWORDS = {"and", "or", "not", "in", "true", "false", "null"}


# -- AST ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Node:
    pass


@dataclass(frozen=True)
class Literal(Node):
    value: Any
    span: tuple[int, int] = field(default=(0, 0), compare=False)


@dataclass(frozen=True)
class Path(Node):
    """``root`` is ``input`` or an output name; ``segments`` are field names and indexes."""

    root: str
    segments: tuple[str | int, ...] = ()
    span: tuple[int, int] = field(default=(0, 0), compare=False)

    def __str__(self) -> str:
        out = self.root
        for s in self.segments:
            out += f"[{s}]" if isinstance(s, int) else f".{s}"
        return out


@dataclass(frozen=True)
class Ref(Node):
    """``${a ?? b ?? "default"}``: the first alternative that has a value."""

    alts: tuple[Path | Literal, ...]
    span: tuple[int, int] = field(default=(0, 0), compare=False)


@dataclass(frozen=True)
class Name(Node):
    """A bare word in a condition: always an error (references are written ``${...}``)."""

    name: str
    span: tuple[int, int] = field(default=(0, 0), compare=False)


@dataclass(frozen=True)
class Call(Node):
    name: str
    args: tuple[Node, ...]
    span: tuple[int, int] = field(default=(0, 0), compare=False)


@dataclass(frozen=True)
class ListExpr(Node):
    items: tuple[Node, ...]
    span: tuple[int, int] = field(default=(0, 0), compare=False)


@dataclass(frozen=True)
class Not(Node):
    operand: Node
    span: tuple[int, int] = field(default=(0, 0), compare=False)


@dataclass(frozen=True)
class BoolOp(Node):
    op: str  # "and" | "or"
    left: Node
    right: Node
    span: tuple[int, int] = field(default=(0, 0), compare=False)


@dataclass(frozen=True)
class Compare(Node):
    op: str  # == != < <= > >= in "not in"
    left: Node
    right: Node
    span: tuple[int, int] = field(default=(0, 0), compare=False)


class ExprSyntaxError(Exception):
    """``offset`` is 0-based into the parsed text."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset


# -- parsing -----------------------------------------------------------------------------------
def _span(meta: Any) -> tuple[int, int]:
    return (getattr(meta, "start_pos", 0), getattr(meta, "end_pos", 0))


def _unquote(tok: str) -> str:
    body = tok[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)


@v_args(meta=True)
class _ToAst(Transformer):
    def or_(self, meta: Any, c: list) -> Node:
        return BoolOp("or", c[0], c[1], _span(meta))

    def and_(self, meta: Any, c: list) -> Node:
        return BoolOp("and", c[0], c[1], _span(meta))

    def not_(self, meta: Any, c: list) -> Node:
        return Not(c[0], _span(meta))

    def compare(self, meta: Any, c: list) -> Node:
        return Compare(str(c[1]), c[0], c[2], _span(meta))

    def in_(self, meta: Any, c: list) -> Node:
        return Compare("in", c[0], c[1], _span(meta))

    def not_in(self, meta: Any, c: list) -> Node:
        return Compare("not in", c[0], c[1], _span(meta))

    def call(self, meta: Any, c: list) -> Node:
        args = tuple(a for a in c[1:] if a is not None)
        return Call(str(c[0]), args, _span(meta))

    def bare_name(self, meta: Any, c: list) -> Node:
        return Name(str(c[0]), _span(meta))

    def list_(self, meta: Any, c: list) -> Node:
        return ListExpr(tuple(a for a in c if a is not None), _span(meta))

    def ref(self, meta: Any, c: list) -> Node:
        return Ref(c[0], _span(meta))

    def coalesce(self, meta: Any, c: list) -> tuple:
        return tuple(c)

    def path(self, meta: Any, c: list) -> Node:
        return Path(str(c[0]), tuple(c[1:]), _span(meta))

    def field_(self, meta: Any, c: list) -> str:
        return str(c[0])

    def index(self, meta: Any, c: list) -> int:
        return int(c[0])

    def key(self, meta: Any, c: list) -> str:
        return _unquote(str(c[0]))

    def string(self, meta: Any, c: list) -> Node:
        return Literal(_unquote(str(c[0])), _span(meta))

    def number(self, meta: Any, c: list) -> Node:
        text = str(c[0])
        value: int | float = float(text) if any(ch in text for ch in ".eE") else int(text)
        return Literal(value, _span(meta))

    def true(self, meta: Any, c: list) -> Node:
        return Literal(True, _span(meta))

    def false(self, meta: Any, c: list) -> Node:
        return Literal(False, _span(meta))

    def null(self, meta: Any, c: list) -> Node:
        return Literal(None, _span(meta))


_parser = Lark(_GRAMMAR, parser="lalr", start=["expr", "coalesce"],
               propagate_positions=True, maybe_placeholders=True)
_to_ast = _ToAst()

_TOKEN_NAMES = {
    "RPAR": "')'", "LPAR": "'('", "RBRACE": "'}'", "DOLLAR": "'${'", "RSQB": "']'",
    "LSQB": "'['", "COMMA": "','", "DOT": "'.'", "COMP": "a comparison", "NAME": "a name",
    "STRING": "a string", "NUMBER": "a number", "INT": "an index", "$END": "end of input",
    "OR": "'or'", "AND": "'and'", "NOT": "'not'", "IN": "'in'", "QMARK": "'??'",
}


def _describe_expected(expected: set[str]) -> str:
    names = sorted({_TOKEN_NAMES.get(e, e.lower()) for e in expected if not e.startswith("__")})
    if len(names) > 6:
        names = [*names[:6], "..."]
    return ", ".join(names)


def _syntax_error(exc: UnexpectedInput, text: str) -> ExprSyntaxError:
    if isinstance(exc, UnexpectedCharacters):
        ch = text[exc.pos_in_stream] if exc.pos_in_stream < len(text) else ""
        hint = "; use 'and', 'or', 'not'" if ch in "&|!" and text[exc.pos_in_stream:][:2] != "!=" \
            else ""
        if ch == "=":
            hint = "; use '==' to compare"
        return ExprSyntaxError(f"unexpected character '{ch}'{hint}", exc.pos_in_stream)
    if isinstance(exc, UnexpectedEOF):
        return ExprSyntaxError(
            f"unexpected end of expression; expected {_describe_expected(set(exc.expected))}",
            len(text))
    if isinstance(exc, UnexpectedToken):
        tok: Token = exc.token
        if tok.type == "$END":
            return ExprSyntaxError(
                f"unexpected end of expression; expected {_describe_expected(exc.expected)}",
                len(text))
        pos = tok.start_pos if tok.start_pos is not None else 0
        return ExprSyntaxError(
            f"unexpected '{tok}'; expected {_describe_expected(exc.expected)}", pos)
    return ExprSyntaxError(str(exc), 0)  # pragma: no cover


def _parse(text: str, start: str) -> Any:
    try:
        tree = _parser.parse(text, start=start)
    except UnexpectedInput as exc:
        raise _syntax_error(exc, text) from None
    except RecursionError:
        raise ExprSyntaxError("expression is nested too deeply", 0) from None
    try:
        return _to_ast.transform(tree)
    except RecursionError:
        raise ExprSyntaxError("expression is nested too deeply", 0) from None


def parse_condition(text: str) -> Node:
    """Parse a `when:` condition. Raises :class:`ExprSyntaxError`."""
    if not text.strip():
        raise ExprSyntaxError("empty condition", 0)
    return _parse(text, "expr")


def parse_reference(inner: str) -> Ref:
    """Parse the inside of ``${...}``. Raises :class:`ExprSyntaxError`."""
    if not inner.strip():
        raise ExprSyntaxError("empty reference", 0)
    alts = _parse(inner, "coalesce")
    return Ref(alts, (0, len(inner)))


@dataclass(frozen=True)
class TemplatePart:
    """One ``${...}`` found in a template: where it is, and what it parsed to."""

    start: int  # offset of '$' in the template
    end: int  # offset after '}'
    ref: Ref | None
    error: ExprSyntaxError | None = None  # offset relative to the template


_REF_START = re.compile(r"\$\$\{|\$\{")


def scan_template(text: str) -> Iterator[TemplatePart]:
    """Every ``${...}`` in ``text`` (``$${`` is a literal ``${``)."""
    pos = 0
    while True:
        m = _REF_START.search(text, pos)
        if m is None:
            return
        if m.group() == "$${":
            pos = m.end()
            continue
        start = m.start()
        end = _closing_brace(text, m.end())
        if end < 0:
            yield TemplatePart(start, len(text), None,
                               ExprSyntaxError("unterminated '${': missing '}'", start))
            return
        inner = text[m.end() : end]
        try:
            ref = parse_reference(inner)
        except ExprSyntaxError as exc:
            yield TemplatePart(start, end + 1, None,
                               ExprSyntaxError(exc.message, m.end() + exc.offset))
        else:
            yield TemplatePart(start, end + 1, ref)
        pos = end + 1


def _closing_brace(text: str, i: int) -> int:
    """Offset of the '}' closing a reference that starts at ``i``; quotes may hold braces."""
    quote = ""
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "}":
            return i
        elif ch == "\n":
            return -1
        i += 1
    return -1


def single_reference(text: str) -> Ref | None:
    """The reference when ``text`` is exactly one ``${...}`` (its value keeps its type)."""
    s = text.strip()
    if not (s.startswith("${") and s.endswith("}")):
        return None
    parts = list(scan_template(s))
    if len(parts) == 1 and parts[0].ref is not None and parts[0].start == 0 \
            and parts[0].end == len(s):
        return parts[0].ref
    return None


def walk(node: Node) -> Iterator[Node]:
    """Every node of an expression, parents first."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        if isinstance(n, Not):
            stack.append(n.operand)
        elif isinstance(n, BoolOp | Compare):
            stack.extend((n.right, n.left))
        elif isinstance(n, Call | ListExpr):
            stack.extend(reversed(n.args if isinstance(n, Call) else n.items))


def references(node: Node) -> list[Ref]:
    return [n for n in walk(node) if isinstance(n, Ref)]


# -- functions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Function:
    params: tuple[str, ...]  # accepted kinds per parameter; "any" accepts all
    returns: T.Type
    impl: Callable[..., Any]


def _length(x: Any) -> int:
    if isinstance(x, str | list | dict):
        return len(x)
    raise EvalError(f"length() needs a string, array or object, not {_kind(x)}")


def _str_fn(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        for a in args:
            if not isinstance(a, str):
                raise EvalError(f"{name}() needs strings, not {_kind(a)}")
        return fn(*args)
    return call


def _contains(container: Any, item: Any) -> bool:
    if isinstance(container, str):
        if not isinstance(item, str):
            raise EvalError(f"contains() on a string needs a string, not {_kind(item)}")
        return item in container
    if isinstance(container, list | dict):
        return item in container
    raise EvalError(f"contains() needs a string, array or object, not {_kind(container)}")


FUNCTIONS: dict[str, Function] = {
    "length": Function(("string|array|object",), T.INTEGER, _length),
    "contains": Function(("string|array|object", "any"), T.BOOLEAN, _contains),
    "startswith": Function(("string", "string"), T.BOOLEAN,
                           _str_fn("startswith", lambda s, p: s.startswith(p))),
    "endswith": Function(("string", "string"), T.BOOLEAN,
                         _str_fn("endswith", lambda s, p: s.endswith(p))),
    "lower": Function(("string",), T.STRING, _str_fn("lower", str.lower)),
    "upper": Function(("string",), T.STRING, _str_fn("upper", str.upper)),
    "trim": Function(("string",), T.STRING, _str_fn("trim", str.strip)),
}


# -- evaluation --------------------------------------------------------------------------------
class EvalError(Exception):
    """A condition could not be evaluated on the run's actual values."""


class Missing(Exception):
    """A reference whose every alternative is missing (its producers were skipped)."""

    def __init__(self, ref: Ref) -> None:
        super().__init__(" ?? ".join(str(a) for a in ref.alts if isinstance(a, Path)))
        self.ref = ref


MISSING: Any = object()


def _kind(x: Any) -> str:
    return T.of_value(x).kind


def resolve_path(path: Path, scope: Callable[[str], Any]) -> Any:
    """The value at ``path``, or ``MISSING`` when the root is missing or a field is absent."""
    value = scope(path.root)
    for seg in path.segments:
        if value is MISSING or value is None:
            return MISSING
        if isinstance(seg, int):
            if not isinstance(value, list) or not -len(value) <= seg < len(value):
                return MISSING
            value = value[seg]
        else:
            if not isinstance(value, dict) or seg not in value:
                return MISSING
            value = value[seg]
    return value


def resolve_ref(ref: Ref, scope: Callable[[str], Any]) -> Any:
    """The first alternative of ``ref`` that has a value; raises :class:`Missing`."""
    for alt in ref.alts:
        if isinstance(alt, Literal):
            return alt.value
        value = resolve_path(alt, scope)
        if value is not MISSING:
            return value
    raise Missing(ref)


def evaluate(node: Node, scope: Callable[[str], Any]) -> Any:
    """Evaluate an expression. ``scope(name)`` gives the value of ``input`` or an output name
    (``MISSING`` if it has none)."""
    if isinstance(node, Literal):
        return node.value
    if isinstance(node, Ref):
        return resolve_ref(node, scope)
    if isinstance(node, Not):
        return not _truthy(evaluate(node.operand, scope))
    if isinstance(node, BoolOp):
        left = _truthy(evaluate(node.left, scope))
        if node.op == "and":
            return left and _truthy(evaluate(node.right, scope))
        return left or _truthy(evaluate(node.right, scope))
    if isinstance(node, Compare):
        return _compare(node.op, evaluate(node.left, scope), evaluate(node.right, scope))
    if isinstance(node, ListExpr):
        return [evaluate(i, scope) for i in node.items]
    if isinstance(node, Call):
        fn = FUNCTIONS.get(node.name)
        if fn is None or len(node.args) != len(fn.params):
            raise EvalError(f"unknown function {node.name}()")
        return fn.impl(*(evaluate(a, scope) for a in node.args))
    if isinstance(node, Name):
        raise EvalError(f"bare name '{node.name}'")
    raise EvalError(f"cannot evaluate {type(node).__name__}")  # pragma: no cover


def _truthy(v: Any) -> bool:
    return bool(v)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _compare(op: str, a: Any, b: Any) -> bool:
    if op == "==":
        return _equal(a, b)
    if op == "!=":
        return not _equal(a, b)
    if op in ("in", "not in"):
        if isinstance(b, str):
            if not isinstance(a, str):
                raise EvalError(f"'in' a string needs a string, not {_kind(a)}")
            found = a in b
        elif isinstance(b, list):
            found = any(_equal(a, x) for x in b)
        elif isinstance(b, dict):
            found = a in b if isinstance(a, str) else False
        else:
            raise EvalError(f"'in' needs a string, array or object on its right, not {_kind(b)}")
        return found if op == "in" else not found
    if not ((_is_num(a) and _is_num(b)) or (isinstance(a, str) and isinstance(b, str))):
        raise EvalError(f"cannot order {_kind(a)} and {_kind(b)} with '{op}'")
    return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]


def _equal(a: Any, b: Any) -> bool:
    # true == 1 is false here: a boolean is not a number, as in JSON.
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    return bool(a == b)

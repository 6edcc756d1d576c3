"""The expression language: `${...}` references and `when:` conditions.

One small recursive-descent parser reads both. Conditions are evaluated by walking the AST
with a fixed set of operators and pure functions: user text is never handed to Python's
`eval`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from flowc import types as T

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
# A recursive-descent parser over a one-regex tokenizer. (An LALR grammar in lark gave the same
# trees at ~600 µs a condition; this takes ~25 µs, which keeps `flowc check` on a 10,000-step
# file within its budget. See docs/benchmarks.md.)
#
#   expr       := and ("or" and)*
#   and        := not ("and" not)*
#   not        := "not" not | comparison
#   comparison := atom [("==" | "!=" | "<" | "<=" | ">" | ">=" | "in" | "not" "in") atom]
#   atom       := "${" coalesce "}" | literal | NAME "(" [expr ("," expr)*] ")" | NAME
#               | "(" expr ")" | "[" [expr ("," expr)*] "]"
#   coalesce   := alt ("??" alt)*        alt := path | literal
#   path       := NAME ("." NAME | "[" INT "]" | "[" STRING "]")*
_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r\n]+)
  | (?P<number>-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*')
  | (?P<name>[A-Za-z_][A-Za-z0-9_-]*)
  | (?P<op>\$\{|\?\?|==|!=|<=|>=|[<>(){}\[\],.])
""", re.VERBOSE)
_MAX_DEPTH = 100
_MAX_NUMBER = 100  # characters in a number literal


@dataclass(frozen=True)
class _Tok:
    kind: str  # number | string | name | op | end
    text: str
    start: int

    @property
    def end(self) -> int:
        return self.start + len(self.text)


def _tokenize(text: str) -> list[_Tok]:
    toks, pos, n = [], 0, len(text)
    while pos < n:
        m = _TOKEN.match(text, pos)
        if m is None:
            ch = text[pos]
            hint = ""
            if text.startswith(("=>", "=<"), pos):
                hint = f"; did you mean '{text[pos + 1]}='?"
            elif ch == "=":
                hint = "; use '==' to compare"
            elif ch in "&|!":
                hint = "; use 'and', 'or', 'not'"
            elif ch in "\"'":
                raise ExprSyntaxError("unterminated string", pos)
            raise ExprSyntaxError(f"unexpected character '{ch}'{hint}", pos)
        kind = m.lastgroup
        if kind != "ws":
            toks.append(_Tok(kind, m.group(), pos))  # type: ignore[arg-type]
        pos = m.end()
    toks.append(_Tok("end", "", n))
    return toks


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0
        self.depth = 0

    # -- helpers ---------------------------------------------------------------------------
    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def at(self, text: str, kind: str = "op") -> bool:
        t = self.toks[self.i]
        return t.kind == kind and t.text == text

    def at_keyword(self, word: str) -> bool:
        return self.at(word, "name")

    def next(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def fail(self, expected: str) -> ExprSyntaxError:
        t = self.tok
        if t.kind == "end":
            return ExprSyntaxError(f"unexpected end of expression; expected {expected}", t.start)
        return ExprSyntaxError(f"unexpected '{t.text}'; expected {expected}", t.start)

    def expect(self, text: str) -> _Tok:
        if not self.at(text):
            raise self.fail(f"'{text}'")
        return self.next()

    def done(self, node: Any) -> Any:
        if self.tok.kind != "end":
            raise self.fail("an operator ('and', 'or', '==', ...) or the end")
        return node

    # -- grammar ---------------------------------------------------------------------------
    def expr(self) -> Node:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise ExprSyntaxError("expression is nested too deeply", self.tok.start)
        left = self.and_()
        while self.at_keyword("or"):
            self.next()
            right = self.and_()
            left = BoolOp("or", left, right, (left.span[0], right.span[1]))
        self.depth -= 1
        return left

    def and_(self) -> Node:
        left = self.not_()
        while self.at_keyword("and"):
            self.next()
            right = self.not_()
            left = BoolOp("and", left, right, (left.span[0], right.span[1]))
        return left

    def not_(self) -> Node:
        if self.at_keyword("not"):
            start = self.next().start
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise ExprSyntaxError("expression is nested too deeply", start)
            operand = self.not_()
            self.depth -= 1
            return Not(operand, (start, operand.span[1]))
        return self.comparison()

    def comparison(self) -> Node:
        left = self.atom()
        t = self.tok
        if t.kind == "op" and t.text in ("==", "!=", "<", "<=", ">", ">="):
            op = self.next().text
        elif self.at_keyword("in"):
            self.next()
            op = "in"
        elif self.at_keyword("not") and self.toks[self.i + 1].kind == "name" \
                and self.toks[self.i + 1].text == "in":
            self.i += 2
            op = "not in"
        else:
            return left
        right = self.atom()
        return Compare(op, left, right, (left.span[0], right.span[1]))

    def atom(self) -> Node:
        t = self.tok
        if t.kind == "op":
            if t.text == "${":
                self.next()
                alts = self.coalesce()
                end = self.expect("}").end
                return Ref(alts, (t.start, end))
            if t.text == "(":
                self.next()
                inner = self.expr()
                self.expect(")")
                return inner
            if t.text == "[":
                self.next()
                items = self.items("]")
                return ListExpr(items, (t.start, self.toks[self.i - 1].end))
        if t.kind == "name" and t.text not in _LITERAL_WORDS:
            if t.text in _KEYWORDS:
                raise self.fail("a value")
            self.next()
            if self.at("("):
                self.next()
                args = self.items(")")
                return Call(t.text, args, (t.start, self.toks[self.i - 1].end))
            return Name(t.text, (t.start, t.end))
        lit = self.literal()
        if lit is None:
            raise self.fail("a value: ${...}, a string, a number, true, false, null, "
                            "'(', '[' or a function call")
        return lit

    def items(self, close: str) -> tuple[Node, ...]:
        out: list[Node] = []
        if self.at(close):
            self.next()
            return ()
        while True:
            out.append(self.expr())
            if self.at(","):
                self.next()
                continue
            self.expect(close)
            return tuple(out)

    def literal(self) -> Literal | None:
        t = self.tok
        if t.kind == "number":
            if len(t.text) > _MAX_NUMBER:  # int() refuses past 4,300 digits, and no sane
                raise ExprSyntaxError(  # condition needs a fraction of that
                    f"number literal is too long ({len(t.text)} characters; at most "
                    f"{_MAX_NUMBER})", t.start)
            self.next()
            value: Any = float(t.text) if any(c in t.text for c in ".eE") else int(t.text)
            return Literal(value, (t.start, t.end))
        if t.kind == "string":
            self.next()
            return Literal(_unquote(t.text), (t.start, t.end))
        if t.kind == "name" and t.text in _LITERAL_WORDS:
            self.next()
            return Literal(_LITERAL_WORDS[t.text], (t.start, t.end))
        return None

    def coalesce(self) -> tuple[Path | Literal, ...]:
        alts = [self.alt()]
        while self.at("??"):
            self.next()
            alts.append(self.alt())
        return tuple(alts)

    def alt(self) -> Path | Literal:
        t = self.tok
        if t.kind == "name" and t.text not in _KEYWORDS:
            return self.path()
        lit = self.literal()
        if lit is None:
            raise self.fail("a name or a literal")
        return lit

    def path(self) -> Path:
        root = self.next()
        segs: list[str | int] = []
        end = root.end
        while True:
            if self.at("."):
                self.next()
                t = self.tok
                if t.kind != "name":
                    raise self.fail("a field name")
                segs.append(self.next().text)
                end = t.end
            elif self.at("["):
                self.next()
                t = self.tok
                if t.kind == "number" and t.text.lstrip("-").isdigit():
                    segs.append(int(self.next().text))
                elif t.kind == "string":
                    segs.append(_unquote(self.next().text))
                else:
                    raise self.fail("an index or a quoted key")
                end = self.expect("]").end
            else:
                return Path(root.text, tuple(segs), (root.start, end))


_LITERAL_WORDS: dict[str, Any] = {"true": True, "false": False, "null": None}


def _unquote(tok: str) -> str:
    body = tok[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)


def parse_condition(text: str) -> Node:
    """Parse a `when:` condition. Raises :class:`ExprSyntaxError`."""
    if not text.strip():
        raise ExprSyntaxError("empty condition", 0)
    p = _Parser(text)
    return p.done(p.expr())


def parse_reference(inner: str) -> Ref:
    """Parse the inside of ``${...}``. Raises :class:`ExprSyntaxError`."""
    if not inner.strip():
        raise ExprSyntaxError("empty reference", 0)
    p = _Parser(inner)
    alts = p.coalesce()
    if p.tok.kind != "end":
        raise p.fail("'??' or '}'")
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


@lru_cache(maxsize=4096)  # a run reads each output template once per item of a map
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
    optional: int = 0  # how many of the last params may be left out
    item_kinds: str | None = None  # the kinds the first param's elements may have
    # the result's type from the arguments' types and nodes, when `returns` is too coarse
    infer: Callable[[list[T.Type], tuple[Node, ...]], T.Type] | None = None

    def arity_ok(self, n: int) -> bool:
        return len(self.params) - self.optional <= n <= len(self.params)

    def result_type(self, types: list[T.Type], args: tuple[Node, ...]) -> T.Type:
        return self.returns if self.infer is None else self.infer(types, args)


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
    if isinstance(container, list):  # as `in`: true is not 1
        return any(_equal(item, x) for x in container)
    if isinstance(container, dict):  # a key; an array or object is never one (unhashable)
        return isinstance(item, str) and item in container
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
    """The value at ``path``, or ``MISSING`` when the root is missing, a field is absent or
    the value is JSON null (a model told to "use null when absent" means absent, and the
    compiler types nullable fields as maybe-missing: `${a.x ?? 0}` takes its fallback)."""
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
    return MISSING if value is None else value


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
        if fn is None or not fn.arity_ok(len(node.args)):
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


# The string, list, dict, math and JSON functions (transforms use them most) build on the
# classes above: imported last.
from flowc.functions import PURE_FUNCTIONS  # noqa: E402

FUNCTIONS.update(PURE_FUNCTIONS)

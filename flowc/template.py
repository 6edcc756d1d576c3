"""Prompt templates: `${...}` references, plus sandboxed Jinja2 where a prompt needs loops or
filters.

A reference is replaced by a Jinja variable before Jinja sees the text, so a value is
inserted as data and never parsed as template code (no template injection through a model's
output).

Jinja code is bounded (docs/dsl.md, "Limits"): a render may write so many characters, run so
many loop iterations and take so long; `*`, `**`, `+`, `%`, `~`, string methods and the
filters that can multiply a value's size check the size of what they would build *before*
building it (a C-level `'a' * 10**9` cannot be interrupted once started). Past a limit the
render raises :class:`TemplateLimitError`. :func:`render_async` renders in a worker thread
and stops that render at its next check when the awaiting task is cancelled.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from functools import cache, lru_cache, wraps
from typing import TYPE_CHECKING, Any

from flowc.expr import TemplatePart, resolve_ref, scan_template

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from jinja2 import Template as JinjaTemplate
    from jinja2.sandbox import ImmutableSandboxedEnvironment

_JINJA_SYNTAX = re.compile(r"\{\{|\{%|\{#")


@dataclass(frozen=True)
class TemplateLimits:
    """What one render of a Jinja template may do."""

    max_output: int = 1 << 20  # characters written (also the largest value it may build)
    max_iterations: int = 100_000  # loop iterations, all loops together
    max_seconds: float = 2.0  # wall-clock time
    max_int_bits: int = 1 << 16  # the largest integer arithmetic may build


LIMITS = TemplateLimits()


class TemplateLimitError(Exception):
    """A render went past one of its :class:`TemplateLimits`."""

    def __init__(self, kind: str, limit: float, unit: str, detail: str | None = None) -> None:
        self.kind, self.limit = kind, limit
        detail = f": {detail}" if detail else ""
        super().__init__(f"exceeded the {kind} limit{detail} (limit {limit:g} {unit})"
                         if isinstance(limit, float) else
                         f"exceeded the {kind} limit{detail} (limit {limit} {unit})")


class RenderCancelled(Exception):
    """The render's caller stopped waiting for it."""


class _Budget:
    """One render's counters; template code reaches it through a thread-local."""

    __slots__ = ("control", "deadline", "iterations", "limits", "ticks", "written")

    def __init__(self, limits: TemplateLimits, control: _Control | None = None) -> None:
        self.limits = limits
        self.written = self.iterations = self.ticks = 0
        self.deadline = time.monotonic() + limits.max_seconds
        self.control = control

    def tick(self) -> None:
        """Called at every loop iteration, call, operator and output: each does bounded work,
        so checking the clock and the cancel flag every 8th keeps both prompt."""
        self.ticks += 1
        if self.ticks & 7:
            return
        if self.control is not None and self.control.cancelled:
            raise RenderCancelled()
        if time.monotonic() > self.deadline:
            raise TemplateLimitError("render time", self.limits.max_seconds, "s")

    def iterate(self) -> None:
        self.iterations += 1
        if self.iterations > self.limits.max_iterations:
            raise TemplateLimitError("loop iteration", self.limits.max_iterations,
                                     "iterations")
        self.tick()

    def write(self, n: int) -> None:
        self.written += n
        if self.written > self.limits.max_output:
            raise TemplateLimitError("output size", self.limits.max_output, "characters")
        self.tick()

    def size(self, n: int, what: str) -> None:
        """Refuse to build a value of ``n`` characters (or items)."""
        if n > self.limits.max_output:
            raise TemplateLimitError("value size", self.limits.max_output, "characters",
                                     f"{what} would build {n} characters")

    def bits(self, n: int, what: str) -> None:
        if n > self.limits.max_int_bits:
            raise TemplateLimitError("integer size", self.limits.max_int_bits, "bits",
                                     f"{what} would build a {n}-bit integer")

    def built(self, value: Any, what: str) -> Any:
        if isinstance(value, str | bytes | list | tuple) and len(value) > self.limits.max_output:
            self.size(len(value), what)
        return value


@dataclass
class _Control:
    cancelled: bool = False


_state = threading.local()


def _budget() -> _Budget:
    b = getattr(_state, "budget", None)
    return b if b is not None else _Budget(LIMITS)  # outside a render: compile-time folding


def _text_size(value: Any, cap: int) -> int:
    """About ``len(str(value))``, counting a shared value once per reference, and stopping
    once past ``cap`` (so a list holding the same big list a million times costs little)."""
    if type(value) is str:
        return len(value)
    from jinja2.utils import Namespace

    total, stack = 0, [value]
    while stack and total <= cap:
        v = stack.pop()
        if isinstance(v, str | bytes):
            total += len(v) + 2
        elif isinstance(v, bool | float) or v is None:
            total += 5
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 1
        elif isinstance(v, range):
            total += 20
        elif isinstance(v, Namespace):
            stack.append(v._Namespace__attrs)  # type: ignore[attr-defined]
        elif isinstance(v, Mapping):
            total += 2 + 4 * len(v)
            if total <= cap:
                stack.extend(v.keys())
                stack.extend(v.values())
        elif isinstance(v, Collection):
            total += 2 + 2 * len(v)
            if total <= cap:
                stack.extend(v)
        else:
            total += 16
    return total


def _text_of(b: _Budget, value: Any, what: str) -> None:
    """Refuse to turn ``value`` into text past the size limit."""
    if type(value) is not str:
        b.size(_text_size(value, b.limits.max_output), what)


# -- the checks on operators, calls and filters ---------------------------------------------
_WIDTH = re.compile(r"\d+")
_FORMATTER = None


def _check_format(b: _Budget, fmt: Any, args: Any, percent: bool) -> None:
    """``fmt % args`` or ``fmt.format(...)``: bounded by the format's text, its fields times
    the largest argument, and its widths."""
    if not isinstance(fmt, str):
        return
    cap = b.limits.max_output
    values = list(args.values()) if isinstance(args, Mapping) else list(args)
    biggest = max((_text_size(v, cap) for v in values), default=0)
    widths = [int(w) if len(w) < 12 else cap + 1 for w in _WIDTH.findall(fmt)]
    if percent:
        fields, nested = fmt.count("%"), "*" in fmt
    else:
        fields, nested = fmt.count("{"), any("{" in (spec or "") for _, _, spec, _ in
                                              _parse_format(fmt))
    if nested:  # a width taken from the arguments
        widths += [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    b.size(len(fmt) + fields * biggest + max(widths, default=0),
           "formatting" if percent else "str.format")


def _parse_format(fmt: str) -> list[tuple[Any, ...]]:
    import string

    try:
        return list(string.Formatter().parse(fmt))
    except ValueError:
        return []


def _check_binop(b: _Budget, op: str, left: Any, right: Any) -> None:
    if op == "*":
        if isinstance(left, int) and isinstance(right, int):
            b.bits(left.bit_length() + right.bit_length(), "`*`")
            return
        seq, n = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(seq, str | bytes | list | tuple) and isinstance(n, int) and n > 1:
            b.size(len(seq) * n, "`*`")
    elif op == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 1:
            b.bits(max(1, left.bit_length() - 1) * right, "`**`")
    elif op == "+":
        if isinstance(left, str | bytes | list | tuple) and isinstance(right, Collection):
            b.size(len(left) + len(right), "`+`")
    elif op == "%" and isinstance(left, str):
        _check_format(b, left, right if isinstance(right, tuple | Mapping) else (right,), True)


def _check_str_method(b: _Budget, s: str | bytes, name: str, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """The str methods that can build more than their input; returns the (possibly
    materialised) positional arguments."""
    what = f"str.{name}"
    if name in ("center", "ljust", "rjust", "zfill"):
        width = args[0] if args else kwargs.get("width", 0)
        if isinstance(width, int):
            b.size(width, what)
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int):
            b.size(len(s) + s.count("\t" if isinstance(s, str) else b"\t") * size, what)
    elif name == "replace" and len(args) >= 2:
        old, new = args[0], args[1]
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        if isinstance(old, str | bytes) and isinstance(new, str | bytes):
            n = s.count(old) if old else len(s) + 1  # type: ignore[arg-type]
            if isinstance(count, int) and count >= 0:
                n = min(n, count)
            b.size(len(s) + n * max(0, len(new) - len(old)), what)
    elif name == "join" and args:
        items = list(args[0])
        cap = b.limits.max_output
        b.size(len(s) * max(0, len(items) - 1) + sum(
            _text_size(i, cap) for i in items), what)
        return (items, *args[1:])
    elif name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str | bytes)),
                      default=1)
        b.size(len(s) * max(1, longest), what)
    return args


def _counted(iterable: Any) -> Any:
    b = _budget()
    for item in iterable:
        b.iterate()
        yield item


def _bounded_range(*args: int) -> range:
    r = range(*args)
    limit = _budget().limits.max_iterations
    try:
        n = len(r)
    except OverflowError:  # more items than a C integer holds
        n = -1
    if n < 0 or n > limit:
        raise TemplateLimitError("loop iteration", limit, "iterations",
                                 f"range() of {n if n >= 0 else 'more than 2**63'} items")
    return r


def _bounded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    from jinja2.utils import generate_lorem_ipsum

    _budget().size(n * max * 12, "lipsum()")
    return generate_lorem_ipsum(n, html, min, max)


# Filters that turn their value into text, and the extra bound each amplifier needs. Each
# check takes the budget and the filter's arguments after its context/environment.
def _pre_center(b: _Budget, value: Any, width: Any = 80) -> None:
    if isinstance(width, int):
        b.size(width, "center")


def _pre_indent(b: _Budget, s: Any, width: Any = 4, *_: Any, **__: Any) -> None:
    w = width if isinstance(width, int) else len(str(width))
    b.size(_text_size(s, b.limits.max_output) * (1 + w), "indent") if w > 64 else None


def _pre_replace(b: _Budget, s: Any, old: Any = "", new: Any = "", count: Any = None) -> None:
    _check_str_method(b, str(s), "replace", (str(old), str(new),
                                              -1 if count is None else count), {})


def _pre_wordwrap(b: _Budget, s: Any, width: Any = 79, break_long_words: Any = True,
                  wrapstring: Any = None, *_: Any, **__: Any) -> None:
    if wrapstring is not None and isinstance(width, int):
        text = str(s)
        lines = len(text) // max(1, width) + text.count("\n") + 1
        b.size(len(text) + lines * len(str(wrapstring)), "wordwrap")


def _pre_format(b: _Budget, value: Any, *args: Any, **kwargs: Any) -> None:
    _check_format(b, str(value), kwargs or args, True)


def _pre_batch(b: _Budget, value: Any, linecount: Any = 1, fill_with: Any = None) -> None:
    if fill_with is not None and isinstance(linecount, int):
        b.size(linecount, "batch")


def _pre_slice(b: _Budget, value: Any, slices: Any = 1, fill_with: Any = None) -> None:
    if isinstance(slices, int):
        b.size(slices, "slice")


def _pre_tojson(b: _Budget, value: Any, indent: Any = None) -> None:
    w = indent if isinstance(indent, int) else len(indent) if isinstance(indent, str) else 0
    b.size(_text_size(value, b.limits.max_output) * (1 + max(0, w)), "tojson")


_PRECHECKS: dict[str, Callable[..., None]] = {
    "center": _pre_center, "indent": _pre_indent, "replace": _pre_replace,
    "wordwrap": _pre_wordwrap, "format": _pre_format, "batch": _pre_batch,
    "slice": _pre_slice, "tojson": _pre_tojson,
}
_TEXT_FILTERS = frozenset({
    "capitalize", "center", "e", "escape", "forceescape", "format", "indent", "lower",
    "pprint", "replace", "safe", "string", "striptags", "title", "tojson", "trim",
    "truncate", "upper", "urlencode", "urlize", "wordcount", "wordwrap", "xmlattr"})


def _guard_filter(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    skip = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0
    pre = _PRECHECKS.get(name)
    text = name in _TEXT_FILTERS
    what = f"filter {name}"

    if name == "join":
        @wraps(f)
        def join(*args: Any, **kwargs: Any) -> Any:
            b = _budget()
            b.tick()
            args = list(args)
            items = args[skip] = list(args[skip])
            sep = args[skip + 1] if len(args) > skip + 1 else kwargs.get("d", "")
            cap = b.limits.max_output
            b.size(len(str(sep)) * max(0, len(items) - 1) +
                   sum(_text_size(i, cap) for i in items), what)
            return b.built(f(*args, **kwargs), what)
        return join

    if name == "sum":
        @wraps(f)
        def total(*args: Any, **kwargs: Any) -> Any:
            b = _budget()
            b.tick()
            start = args[skip + 2] if len(args) > skip + 2 else kwargs.get("start", 0)
            if isinstance(start, list | tuple):  # concatenation: linear, and bounded
                items = list(args[skip])
                if all(type(i) is type(start) for i in items) and not (
                        len(args) > skip + 1 or kwargs.get("attribute") is not None):
                    b.size(len(start) + sum(len(i) for i in items), what)
                    out = list(start)
                    for i in items:
                        out.extend(i)
                    return type(start)(out)
                args = (*args[:skip], items, *args[skip + 1:])
            return b.built(f(*args, **kwargs), what)
        return total

    @wraps(f)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        b = _budget()
        b.tick()
        if text and len(args) > skip:
            _text_of(b, args[skip], what)
        if pre is not None:
            pre(b, *args[skip:], **kwargs)
        return b.built(f(*args, **kwargs), what)

    return guarded


def _environment_class() -> type[ImmutableSandboxedEnvironment]:
    from jinja2 import nodes, pass_context
    from jinja2.compiler import CodeGenerator, Frame, optimizeconst
    from jinja2.runtime import Context, LoopContext
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.visitor import NodeTransformer

    class Codegen(CodeGenerator):
        @optimizeconst
        def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
            self.write("environment.bounded_concat((")  # `~`, which cannot be intercepted
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class Guard(NodeTransformer):
        """Every `for` counts its iterations, and every output in a loop, macro or `call`
        body counts its literal text too (written once per iteration or call)."""

        repeated = 0

        def _repeated_body(self, node: nodes.Node) -> nodes.Node:
            self.repeated += 1
            try:
                self.generic_visit(node)
            finally:
                self.repeated -= 1
            return node

        def visit_For(self, node: nodes.For) -> nodes.Node:
            self._repeated_body(node)
            node.iter = nodes.Filter(node.iter, _ITERATE, [], [], None, None,
                                     lineno=node.iter.lineno)
            return node

        visit_Macro = visit_CallBlock = _repeated_body

        def visit_Output(self, node: nodes.Output) -> nodes.Node:
            self.generic_visit(node)
            literal = sum(len(n.data) for n in node.nodes if isinstance(n, nodes.TemplateData))
            if self.repeated and literal:
                node.nodes.insert(0, nodes.Filter(nodes.Const(literal), _LITERAL, [], [], None,
                                                  None, lineno=node.lineno))
            return node

    @pass_context
    def finalize(context: Context, value: Any) -> Any:
        b = _budget()
        t = type(value)
        b.write(len(value) if t is str else 8 if t is int and value.bit_length() < 64 else
                _text_size(value, b.limits.max_output))
        return value

    @pass_context
    def iterate(context: Context, iterable: Any) -> Any:
        return _counted(iterable)

    @pass_context
    def literal(context: Context, n: int) -> str:
        _budget().write(n)
        return ""

    class Bounded(ImmutableSandboxedEnvironment):
        code_generator_class = Codegen
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def __init__(self) -> None:
            from jinja2 import StrictUndefined

            super().__init__(undefined=StrictUndefined, autoescape=False,
                             keep_trailing_newline=True, finalize=finalize)
            self.globals["range"] = _bounded_range
            self.globals["lipsum"] = _bounded_lipsum
            self.filters = {n: _guard_filter(n, f) for n, f in self.filters.items()}
            self.filters[_ITERATE] = iterate
            self.filters[_LITERAL] = literal

        def _generate(self, source: nodes.Template, *args: Any, **kwargs: Any) -> str:
            source = Guard().visit(source)
            source.set_environment(self)
            return super()._generate(source, *args, **kwargs)

        def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
            b = _budget()
            b.tick()
            _check_binop(b, operator, left, right)
            return self.binop_table[operator](left, right)

        def bounded_concat(self, parts: tuple[Any, ...]) -> str:
            b = _budget()
            b.tick()
            cap = b.limits.max_output
            b.size(sum(_text_size(p, cap) for p in parts), "`~`")
            return "".join(map(str, parts))

        def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
            b = _budget()
            b.tick()
            if isinstance(obj, LoopContext) and args:  # `loop(children)` in a recursive loop
                args = (_counted(args[0]), *args[1:])
            else:
                target = getattr(obj, "__wrapped__", obj)  # str.format arrives wrapped
                owner = getattr(target, "__self__", None)
                if isinstance(owner, str | bytes):
                    name = getattr(target, "__name__", "")
                    if name in ("format", "format_map"):
                        _check_format(b, owner, kwargs if name == "format" and kwargs
                                      else args[0] if name == "format_map" and args
                                      else args, False)
                    else:
                        args = _check_str_method(b, owner, name, args, kwargs)
            return b.built(super().call(context, obj, *args, **kwargs), "a call")

    return Bounded


_ITERATE, _LITERAL = "__flowc_iterate", "__flowc_literal"


@cache
def jinja_env() -> ImmutableSandboxedEnvironment:
    """The sandboxed, bounded Jinja2 environment (imported on first use: most prompts need
    none)."""
    return _environment_class()()


@lru_cache(maxsize=512)
def _compiled(source: str) -> JinjaTemplate:
    return jinja_env().from_string(source)


@dataclass(frozen=True)
class Template:
    text: str
    parts: tuple[TemplatePart, ...]
    jinja_source: str | None  # set when the text uses Jinja syntax

    @property
    def uses_jinja(self) -> bool:
        return self.jinja_source is not None


def _placeholder(i: int) -> str:
    return f"__flowc_ref_{i}"


def _literal(text: str) -> str:
    return text.replace("$${", "${")  # `$${` writes a literal `${`


def parse_template(text: str) -> Template:
    """Scan ``text``; Jinja syntax, if any, is parsed later by :func:`jinja_reads`."""
    parts = tuple(scan_template(text))
    if not _JINJA_SYNTAX.search(text):
        return Template(text, parts, None)
    pieces, pos = [], 0
    for i, part in enumerate(parts):
        pieces.append(_literal(text[pos : part.start]))
        pieces.append("{{ " + _placeholder(i) + " }}")
        pos = part.end
    pieces.append(_literal(text[pos:]))
    return Template(text, parts, "".join(pieces))


# What a read looks like to the checker: the root name and the static fields and indexes
# after it (`a.label`, `input["x"][0]`), and whether it is guarded against a missing last
# part (`| default(...)`, `is defined`), which StrictUndefined otherwise makes a failure.
JinjaRead = tuple[tuple[str | int, ...], bool]
_GUARD_FILTERS = frozenset({"default", "d"})
_GUARD_TESTS = frozenset({"defined", "undefined"})


def jinja_reads(template: Template) -> list[JinjaRead]:
    """Each read of a free variable (ours excluded), as the longest static chain of fields
    and indexes from its root: `{{ a.label }}` reads ``("a", "label")``; a method call
    reads its receiver (`{{ a.upper() }}` reads ``("a",)``). A root the template also
    assigns (a loop variable, `set`, a macro argument) is read as a root only: which of the
    two a chain means depends on where it stands. Raises ``jinja2.TemplateSyntaxError``."""
    if template.jinja_source is None:
        return []
    from jinja2 import TemplateSyntaxError, meta, nodes

    try:  # Jinja's parser recurses once per nesting level (1,000 parentheses overflow it)
        ast = jinja_env().parse(template.jinja_source)
        free = {n for n in meta.find_undeclared_variables(ast)
                if not n.startswith("__flowc_ref_")}
    except RecursionError:
        raise TemplateSyntaxError("the template nests too deeply", 1) from None
    assigned = {n.name for n in ast.find_all(nodes.Name) if n.ctx in ("store", "param")}
    unset, first = _unset_reads(ast, assigned)
    # Jinja counts a name set under an `{% if %}` as free even when every branch sets it
    # before it is read; such a name is the template's own, not a value from the run.
    free -= (free & assigned) - unset
    # A name Jinja takes as the template's own (set at its top level) but read first in a
    # loop or `with` before that `set`: a render never reads the run's value there, it
    # fails. Jinja's own analysis misses it.
    early = sorted((line, n) for n, line in first.items() if n not in free)
    if early:
        line, name = early[0]
        raise TemplateSyntaxError(f"'{name}' is read before the `{{% set %}}` that sets it: "
                                  "set it first (a loop or `with` reads the template's "
                                  "own name, not a value of the run)", line)
    reads: list[JinjaRead] = []

    def chain(node: nodes.Node) -> tuple[str | int, ...] | None:
        segments: list[str | int] = []
        while True:
            if isinstance(node, nodes.Getattr):
                segments.append(node.attr)
            elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) \
                    and isinstance(node.arg.value, str | int) \
                    and not isinstance(node.arg.value, bool):
                segments.append(node.arg.value)
            elif isinstance(node, nodes.Name) and node.ctx == "load" and node.name in free:
                if node.name in assigned:
                    return (node.name,)
                return (node.name, *reversed(segments))
            else:
                return None
            node = node.node

    def visit(node: nodes.Node, guarded: bool = False) -> None:
        if isinstance(node, nodes.Call) and isinstance(node.node, nodes.Getattr):
            receiver = chain(node.node.node)
            if receiver is not None:
                reads.append((receiver, False))
                for child in (*node.args, *node.kwargs, node.dyn_args, node.dyn_kwargs):
                    if child is not None:
                        visit(child)
                return
        elif isinstance(node, nodes.Filter | nodes.Test) and node.node is not None:
            guard = node.name in (_GUARD_FILTERS if isinstance(node, nodes.Filter)
                                  else _GUARD_TESTS)
            visit(node.node, guard)
            for child in (*node.args, *node.kwargs, node.dyn_args, node.dyn_kwargs):
                if child is not None:
                    visit(child)
            return
        if isinstance(node, nodes.Getattr | nodes.Getitem | nodes.Name):
            path = chain(node)
            if path is not None:
                reads.append((path, guarded))
                return
        for child in node.iter_child_nodes():
            visit(child)

    visit(ast)
    return reads


def _unset_reads(ast: Any, names: set[str]) -> tuple[set[str], dict[str, int]]:
    """Which of ``names`` (set by the template) it may read before setting them: all such
    names, and, for each, the line of the first such read outside a macro. An `{% if %}`
    sets what all its branches set; a loop's, `with`'s, filter block's or `block`'s own
    names end with it; a macro's or call block's body counts nothing set around it (it may
    be called from anywhere). What cannot be told is counted as maybe unset."""
    from jinja2 import nodes

    unset: set[str] = set()
    first: dict[str, int] = {}

    def targets(node: Any) -> set[str]:  # `find_all` looks below a node, not at it
        if isinstance(node, nodes.Name):
            return {node.name}
        return {n.name for n in node.find_all(nodes.Name)}

    def walk(node: Any, done: set[str], exact: bool = True) -> set[str]:
        """Visit ``node`` with ``done`` set before it; return what is set after it."""
        if isinstance(node, list):
            for child in node:
                done = walk(child, done, exact)
            return done
        if isinstance(node, nodes.Name):
            if node.ctx == "load" and node.name in names and node.name not in done:
                unset.add(node.name)
                if exact:
                    first.setdefault(node.name, node.lineno)
            return done
        if isinstance(node, nodes.Assign):
            walk(node.node, done, exact)
            return done | targets(node.target)
        if isinstance(node, nodes.AssignBlock):
            walk(node.body, set(done), exact)
            if node.filter is not None:
                walk(node.filter, done, exact)
            return done | targets(node.target)
        if isinstance(node, nodes.If):
            walk(node.test, done, exact)
            ends = [walk(node.body, set(done), exact)]
            for branch in node.elif_:
                walk(branch.test, done, exact)
                ends.append(walk(branch.body, set(done), exact))
            ends.append(walk(node.else_, set(done), exact))
            return done | set.intersection(*ends)
        if isinstance(node, nodes.For):
            walk(node.iter, done, exact)
            inner = done | targets(node.target) | {"loop"}
            if node.test is not None:
                walk(node.test, inner, exact)
            walk(node.body, set(inner), exact)
            walk(node.else_, set(done), exact)
            return done
        if isinstance(node, nodes.With):
            walk(node.values, done, exact)
            walk(node.body, done.union(*map(targets, node.targets)), exact)
            return done
        if isinstance(node, nodes.Macro | nodes.CallBlock):
            if isinstance(node, nodes.CallBlock):
                walk(node.call, done, exact)
            walk(node.defaults, done, exact)
            walk(node.body, {a.name for a in node.args} | {"caller", "varargs", "kwargs"},
                 False)
            return done | ({node.name} if isinstance(node, nodes.Macro) else set())
        if isinstance(node, nodes.Template | nodes.Output):
            return walk(list(node.iter_child_nodes()), done, exact)
        for child in node.iter_child_nodes():  # anything else keeps what it sets to itself
            walk(child, set(done), exact)
        return done

    walk(ast, set())
    return unset, first


def to_text(value: Any) -> str:
    """How a value reads inside a prompt: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _ref_values(template: Template, scope: Callable[[str], Any]) -> list[str]:
    return [to_text(resolve_ref(p.ref, scope)) for p in template.parts if p.ref is not None]


def render(template: Template, scope: Callable[[str], Any],
           names: Mapping[str, Any] | None = None, *,
           limits: TemplateLimits = LIMITS) -> str:
    """Render with ``scope`` resolving reference roots; ``names`` are the variables Jinja
    code may read (outputs and ``input``). Raises :class:`flowc.expr.Missing`, and
    :class:`TemplateLimitError` when Jinja code goes past ``limits``."""
    values = _ref_values(template, scope)
    if template.jinja_source is None:
        out, pos = [], 0
        for part, value in zip(template.parts, values, strict=True):
            out.append(_literal(template.text[pos : part.start]))
            out.append(value)
            pos = part.end
        out.append(_literal(template.text[pos:]))
        return "".join(out)
    return _render_jinja(template, values, names, limits, None)


def _render_jinja(template: Template, values: list[str], names: Mapping[str, Any] | None,
                  limits: TemplateLimits, control: _Control | None) -> str:
    assert template.jinja_source is not None
    variables = dict(names or {})
    variables.update({_placeholder(i): v for i, v in enumerate(values)})
    outer = getattr(_state, "budget", None)
    _state.budget = _Budget(limits, control)
    try:
        return _compiled(template.jinja_source).render(variables)
    except RecursionError:  # a macro or recursive loop that calls itself without end
        raise TemplateLimitError("recursion depth", sys.getrecursionlimit(), "frames"
                                 ) from None
    finally:
        _state.budget = outer


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    from concurrent.futures import ThreadPoolExecutor  # the runtime's only: `check` starts fast

    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="flowc-render")
        return _POOL


async def render_async(template: Template, scope: Callable[[str], Any],
                       names: Mapping[str, Any] | None = None, *,
                       limits: TemplateLimits = LIMITS) -> str:
    """:func:`render` without blocking the event loop: references are resolved here, Jinja
    code runs in a worker thread. Cancelling the awaiting task (a step's `timeout:`) stops
    the render at its next check."""
    import asyncio  # only the runtime renders: `flowc check` starts without asyncio

    if template.jinja_source is None:
        return render(template, scope)  # plain substitution: linear in the values
    values = _ref_values(template, scope)
    control = _Control()
    future = asyncio.get_running_loop().run_in_executor(
        _pool(), _render_jinja, template, values, names, limits, control)
    try:
        return await future
    except asyncio.CancelledError:
        control.cancelled = True
        raise

"""Conditions: types of every operation, unknown functions, bare names, constant conditions."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from flowc import types as T
from flowc.context import Context, StepInfo
from flowc.expr import (
    FUNCTIONS,
    BoolOp,
    Call,
    Compare,
    EvalError,
    ListExpr,
    Literal,
    Name,
    Node,
    Not,
    Path,
    Ref,
    evaluate,
    references,
)
from flowc.validate import did_you_mean, suggest


def check_conditions(ctx: Context) -> None:
    for info in ctx.steps.values():
        if info.condition is None:
            continue
        checker = _Checker(ctx, info)
        checker.type_of(info.condition)
        if not references(info.condition) and not checker.failed:
            with contextlib.suppress(EvalError):
                info.constant = bool(evaluate(info.condition, lambda name: None))
    for info in ctx.steps.values():
        if info.constant is not None:
            span = ctx.source.span_of((*ctx.step_path(info.step.id), "when"))
            if info.constant:
                ctx.out.add("constant-condition", "condition is always true",
                            span.start, span.end, help="remove `when:`")
            else:
                ctx.out.add("constant-condition",
                            f"condition is always false: step '{info.step.id}' never runs",
                            span.start, span.end)


class _Checker:
    def __init__(self, ctx: Context, info: StepInfo, path: tuple[Any, ...] | None = None,
                 text: str | None = None) -> None:
        """Checks the step's `when:`, or the expression ``text`` at ``path``."""
        self.ctx = ctx
        self.info = info
        self.path = path or (*ctx.step_path(info.step.id), "when")
        self.text = text if text is not None else \
            info.step.when if isinstance(info.step.when, str) else ""
        self.failed = False

    def _error(self, rule: str, message: str, node: Any, help: str | None = None) -> None:
        self.failed = True
        span = self.ctx.value_span(self.path, self.text, *node.span)
        self.ctx.out.add(rule, message, span.start, span.end, help=help)

    def _describe(self, node: Node) -> str:
        start, end = getattr(node, "span", (0, 0))
        return self.text[start:end] or type(node).__name__

    def type_of(self, node: Node) -> T.Type:
        if isinstance(node, Literal):
            return T.of_value(node.value)
        if isinstance(node, Ref):
            local = self.info.local_ref_types.get(node)
            return local if local is not None else self.ctx.ref_types.get(node, T.ANY)
        if isinstance(node, Not):
            self.type_of(node.operand)
            return T.BOOLEAN
        if isinstance(node, BoolOp):
            self.type_of(node.left)
            self.type_of(node.right)
            return T.BOOLEAN
        if isinstance(node, ListExpr):
            return T.Type("array", items=T.join([self.type_of(i) for i in node.items]))
        if isinstance(node, Compare):
            return self._compare(node)
        if isinstance(node, Call):
            return self._call(node)
        if isinstance(node, Name):
            inputs = self.ctx.inputs or {}
            if node.name in self.ctx.producers or node.name in self.ctx.unchecked_outputs:
                target: str | None = node.name
            elif node.name in inputs:
                target = f"input.{node.name}"
            else:
                target = did_you_mean(node.name, [*self.ctx.producers,
                                                  *(f"input.{n}" for n in inputs)])
            self._error("condition-syntax",
                        f"bare name '{node.name}' in condition; references are written ${{...}}",
                        node, help=f"write ${{{target}}}" if target else None)
            return T.ANY
        return T.ANY  # pragma: no cover

    def _compare(self, node: Compare) -> T.Type:
        left, right = self.type_of(node.left), self.type_of(node.right)
        if node.op in ("in", "not in"):
            ok = T.contains_ok(left, right)
        else:
            ok = T.comparable(left, right, node.op)
        if not ok:
            self._error(
                "type-mismatch",
                f"cannot compare {self._operand(node.left, left)} with "
                f"{self._operand(node.right, right)} using '{node.op}'",
                node, help=self._compare_help(node, left, right))
        else:
            self._check_enum(node, left, right)
        return T.BOOLEAN

    def _check_enum(self, node: Compare, left: T.Type, right: T.Type) -> None:
        """A literal compared with a value whose schema lists its values must be one of
        them: `== "tecnical"` against `enum: [technical, ...]` is never true."""
        pairs: list[tuple[Node, T.Type, Node]] = []
        if node.op in ("==", "!="):
            pairs = [(node.left, left, node.right), (node.right, right, node.left)]
        elif node.op in ("in", "not in") and isinstance(node.right, ListExpr):
            pairs = [(node.left, left, item) for item in node.right.items]
        for ref, t, other in pairs:
            if t.values is None or not isinstance(other, Literal):
                continue
            if any(other.value == v and isinstance(other.value, bool) == isinstance(v, bool)
                   for v in t.values):
                continue
            shown = ", ".join(json.dumps(v) for v in t.values)
            hint = did_you_mean(str(other.value), [str(v) for v in t.values])
            self._error("not-in-enum",
                        f"{json.dumps(other.value)} is not a value {self._describe(ref)} can "
                        f"have" + (f"; did you mean {json.dumps(hint)}?" if hint else ""),
                        other, help=f"its schema's enum: {shown}")

    def _operand(self, node: Node, t: T.Type) -> str:
        if isinstance(node, Ref) and len(node.alts) == 1 and isinstance(node.alts[0], Path):
            what = "input" if node.alts[0].root == "input" else "value"
            return f"{t} {what} {self._describe(node)}"
        return f"{t} {self._describe(node)}"

    @staticmethod
    def _compare_help(node: Compare, left: T.Type, right: T.Type) -> str | None:
        if {left.kind, right.kind} == {"string", "integer"} or \
                {left.kind, right.kind} == {"string", "number"}:
            return "compare numbers with numbers (write 2, not \"2\") or strings with strings"
        if node.op in ("in", "not in"):
            return "'in' needs a string, array or object on its right"
        return None

    def _check_alternatives(self, fn: str, ref: Ref, accepted: str) -> None:
        """`${a ?? b}` of two kinds is typed `any` (the types have no unions), yet each
        alternative may come: each must be a kind the function takes."""
        from flowc.checks.references import path_type
        from flowc.scopes import SELF

        step, items = self.info.step, self.info.items
        for alt in ref.alts:
            if not isinstance(alt, Literal) and (
                    alt.root == SELF or (items is not None and alt.root == step.as_)):
                continue  # a name the step binds itself (`self`, the `for_each` item)
            t = T.of_value(alt.value) if isinstance(alt, Literal) else path_type(
                self.ctx, alt, self.ctx.value_span(self.path, self.text, *ref.span))
            if t is not None and t.kind != "any" and t.kind not in accepted.split("|"):
                self._error("type-mismatch", f"{fn}() needs {accepted.replace('|', ' or ')}, "
                            f"but {self._describe(ref)} may be {t} ({alt})", ref)
                return

    def _call(self, node: Call) -> T.Type:
        fn = FUNCTIONS.get(node.name)
        arg_types = [self.type_of(a) for a in node.args]
        if fn is None:
            hint = did_you_mean(node.name, FUNCTIONS)
            self._error("unknown-function", f"unknown function '{node.name}'"
                        + suggest(hint), node,
                        help=f"functions: {', '.join(sorted(FUNCTIONS))}")
            return T.ANY
        if not fn.arity_ok(len(arg_types)):
            most = len(fn.params)
            least = most - fn.optional
            count = f"{least} to {most}" if least != most else str(most)
            self._error("type-mismatch", f"{node.name}() takes {count} argument"
                        f"{'s' if most != 1 else ''}, got {len(arg_types)}", node)
            return fn.returns
        from flowc.functions import may_be_null

        for arg, t, accepted in zip(node.args, arg_types, fn.params, strict=False):
            if accepted != "any" and may_be_null(arg):
                self._error("type-mismatch", f"{node.name}() needs {accepted.replace('|', ' or ')}"
                            f", but {self._describe(arg)} may have no value",
                            arg, help="give it a value to fall back on: get(x, key, <default>)"
                                      " or default(..., <default>)")
            elif t.kinds and accepted != "any" and not t.kinds <= _widened(accepted):
                self._error("type-mismatch", f"{node.name}() needs "
                            f"{accepted.replace('|', ' or ')}, but {self._describe(arg)} may "
                            f"be {' or '.join(sorted(t.kinds - _widened(accepted)))}", arg,
                            help="convert it first (to_json, default with a value of the "
                                 "right kind), or read a value of one kind")
            elif t.kind == "any" and accepted != "any" and isinstance(arg, Ref):
                self._check_alternatives(node.name, arg, accepted)
            elif t.kind != "any" and accepted != "any" and t.kind not in accepted.split("|"):
                self._error("type-mismatch", f"{node.name}() needs "
                            f"{accepted.replace('|', ' or ')}, not {t} {self._describe(arg)}",
                            arg)
        items = arg_types[0].items if arg_types and arg_types[0].kind == "array" else None
        if fn.item_kinds and items is not None and items.kind != "any" \
                and items.kind not in fn.item_kinds.split("|"):
            self._error("type-mismatch", f"{node.name}() needs an array of "
                        f"{fn.item_kinds.replace('|', ' or ')}, not {arg_types[0]} "
                        f"{self._describe(node.args[0])}", node.args[0])
        return fn.result_type(arg_types, node.args)


def _widened(accepted: str) -> set[str]:
    """The kinds a parameter takes (a number parameter takes integers too)."""
    kinds = set(accepted.split("|"))
    return kinds | {"integer"} if "number" in kinds else kinds


ExprChecker = _Checker  # for expressions beyond `when:` (a transform's `expr:`)

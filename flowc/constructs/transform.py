"""`type: transform`: a value computed from references with the expression language (one
expression, or a mapping of field names to expressions) or a template. No model call; the
result's type is inferred from what it reads."""

from __future__ import annotations

from typing import Any

from flowc import foreach
from flowc import types as T
from flowc.context import Context, StepInfo, Use
from flowc.expr import ExprSyntaxError, Node, parse_condition, references, single_reference
from flowc.functions import may_be_null
from flowc.model import TransformStep


def collect(ctx: Context, info: StepInfo) -> None:
    from flowc.checks.references import scan_step_template

    step = info.step
    assert isinstance(step, TransformStep)
    base = ("steps", info.index)
    if step.template is not None:
        template = scan_step_template(ctx, info, (*base, "template"), step.template)
        if template is not None:
            info.templates["template"] = template
    elif isinstance(step.expr, dict):
        parsed = {k: _parse(ctx, info, (*base, "expr", k), v) for k, v in step.expr.items()}
        info.construct = None if None in parsed.values() else parsed
    elif step.expr is not None:
        info.construct = _parse(ctx, info, (*base, "expr"), step.expr)


def _parse(ctx: Context, info: StepInfo, path: tuple[Any, ...], text: str) -> Node | None:
    try:
        node = parse_condition(text)
    except ExprSyntaxError as exc:
        at = ctx.value_span(path, text, exc.offset, exc.offset + 1)
        ctx.out.add("expression-syntax", f"invalid expression: {exc.message}", at.start,
                    at.end)
        return None
    for ref in references(node):
        info.uses.append(Use(info.step.id, ref, ctx.value_span(path, text, *ref.span), "data"))
    return node


def output_type(ctx: Context, info: StepInfo) -> T.Type:
    """Each expression checked (types of operations, functions, bare names) and typed; under
    `for_each`, a list of that (the runtime maps the step like any other)."""
    body = _body_type(ctx, info)
    return foreach.result_type(ctx, info, body) if info.step.for_each is not None else body


def _body_type(ctx: Context, info: StepInfo) -> T.Type:
    from flowc.checks.conditions import ExprChecker

    step = info.step
    assert isinstance(step, TransformStep)
    base = ("steps", info.index)
    if step.template is not None:
        ref = single_reference(step.template)
        return ctx.ref_types.get(ref, T.ANY) if ref is not None else T.STRING
    if info.construct is None:
        return T.ANY
    if isinstance(info.construct, dict):
        assert isinstance(step.expr, dict)
        return T.Type("object", fields=tuple(
            (k, ExprChecker(ctx, info, (*base, "expr", k), step.expr[k]).type_of(node))
            for k, node in info.construct.items()),
            optional=frozenset(k for k, node in info.construct.items() if may_be_null(node)))
    assert isinstance(step.expr, str)
    return ExprChecker(ctx, info, (*base, "expr"), step.expr).type_of(info.construct)


def missing_reason(ctx: Context, info: StepInfo) -> str | None:
    """Why the result may be missing though the step ran: an expression that may have no
    value (a field of a mapping may be left out instead: its type says so)."""
    if isinstance(info.construct, Node) and may_be_null(info.construct):
        return (f"the expression of step '{info.step.id}' may have no value (null, get() "
                "without a default, min/max of an empty array, from_json)")
    return None

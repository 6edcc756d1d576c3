"""`repeat: {until:, max:}` on a step, a loop with a bound (validate and repair): checked
and typed here, run by runtime/repeat.py.

Each attempt may read `${self.previous}` (the last attempt's answer, as text),
`${self.error}` (what was wrong with it: its schema violation, or that `until` was false)
and `${self.attempt}` (1, 2, ...); the first two are missing on the first attempt, so they
need a fallback. `until:` reads `${self.output}`, this attempt's answer, typed as the step's
result. An answer that breaks the step's `response_format` schema never ends the loop.
"""

from __future__ import annotations

import re

from flowc.context import Context, StepInfo, Use
from flowc.expr import ExprSyntaxError, parse_condition, references
from flowc.model import LLMStep
from flowc.scopes import SELF
from flowc.template import Template


def scan(ctx: Context, info: StepInfo) -> None:
    step = info.step
    if step.repeat is None:
        return
    path = (*ctx.step_path(step.id), "repeat")
    until = step.repeat.until
    checks_schema = isinstance(step, LLMStep) and step.response_format is not None \
        and step.response_format.type != "text"
    if until is None and not checks_schema:
        span = ctx.source.span_of(path)
        ctx.out.add("repeat-without-check",
                    "`repeat` has nothing to check: give it `until:`, or give the step a "
                    "`response_format` its answers must match", span.start, span.end,
                    help="e.g. until: ${self.output.valid} == true")
        return
    if not isinstance(until, str):
        return
    try:
        node = parse_condition(until)
    except ExprSyntaxError as exc:
        at = ctx.value_span((*path, "until"), until, exc.offset, exc.offset + 1)
        ctx.out.add("condition-syntax", f"invalid condition: {exc.message}", at.start, at.end)
        return
    info.until = node
    for ref in references(node):
        span = ctx.value_span((*path, "until"), until, *ref.span)
        info.uses.append(Use(step.id, ref, span, "until"))


def check(ctx: Context, info: StepInfo) -> None:
    """Type-check `until:` like a `when:` condition; `self` is read with `${...}` only."""
    if info.step.repeat is not None:
        for name, template in info.templates.items():
            _jinja_self(ctx, info, name, template)
    if info.until is None:
        return
    from flowc.checks.conditions import _Checker

    checker = _Checker(ctx, info)
    checker.path = (*ctx.step_path(info.step.id), "repeat", "until")
    checker.text = info.step.repeat.until  # type: ignore[union-attr,assignment]
    checker.type_of(info.until)


def _jinja_self(ctx: Context, info: StepInfo, name: str, template: Template) -> None:
    """Jinja code cannot read the repeated step's `self`: to Jinja it is the template."""
    if template.jinja_source is None:
        return
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        tree = ImmutableSandboxedEnvironment().parse(template.jinja_source)
    except Exception:  # reported as template-syntax already
        return
    if not any(n.name == SELF for n in tree.find_all(nodes.Name)):
        return
    m = re.search(r"(\{\{|\{%)[^}]*?\bself\b", template.text)
    start = m.end() - len(SELF) if m else 0
    span = ctx.value_span((*ctx.step_path(info.step.id), name), template.text, start,
                          start + len(SELF))
    ctx.out.add("reference-syntax", "in Jinja code `self` is the template itself, not the "
                "repeated step", span.start, span.end,
                help='read it with a reference: ${self.previous ?? "none"}')

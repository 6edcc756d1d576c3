"""`type: switch`: one case of several runs, by the switch's `value:`.

The steps a case names are gated by it (they run only when it is taken) and the switch's
result is the result of the case that ran: the join of the cases, typed as the join of their
result types. The switch's result is always there when the cases are exhaustive (a `default`,
or a case for every value of an enum-typed `value:`) and each case's result step runs whenever
its case is taken: then a four-way router needs no `??` fallback. Steps of the same case read
each other without fallbacks too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from flowc import types as T
from flowc.context import Context, StepInfo, Use
from flowc.expr import (
    Compare,
    ExprSyntaxError,
    ListExpr,
    Literal,
    Node,
    Path,
    Ref,
    parse_condition,
    references,
)
from flowc.model import SwitchStep
from flowc.validate import did_you_mean, suggest

Label = str | bool | int | None  # a case's value; None is the default


@dataclass
class SwitchPlan:
    on: Node  # the parsed `value:`
    cases: list[tuple[Label, list[str]]]  # each case's value and its (known) step ids
    results: dict[str, Label] = field(default_factory=dict)  # result output name -> case
    unmatched: list[Any] | None = None  # enum values no case takes (None: not an enum)
    exhaustive: bool = False

    def label_of(self, output_name: str) -> str:
        label = self.results.get(output_name)
        return "default" if label is None else str(label)


def case_name(switch_id: str, label: Label) -> str:
    return f"the default case of switch '{switch_id}'" if label is None else \
        f"case {json.dumps(label)} of switch '{switch_id}'"


def collect(ctx: Context, info: StepInfo) -> None:
    step = info.step
    assert isinstance(step, SwitchStep)
    base = ("steps", info.index)
    try:
        on = parse_condition(step.value)
    except ExprSyntaxError as exc:
        at = ctx.value_span((*base, "value"), step.value, exc.offset, exc.offset + 1)
        ctx.out.add("expression-syntax", f"invalid expression: {exc.message}", at.start,
                    at.end)
        return
    on_uses = [Use(step.id, ref, ctx.value_span((*base, "value"), step.value, *ref.span),
                   "condition") for ref in references(on)]
    info.uses.extend(on_uses)
    plan = SwitchPlan(on, [])
    labels = [label for label, _ in step.case_bodies() if label is not None]
    results: list[Path] = []
    for label, ids in step.case_bodies():
        key = (*base, "cases", label) if label is not None else (*base, "default")
        test: Node = Compare("==", on, Literal(label)) if label is not None else Compare(
            "not in", on, ListExpr(tuple(Literal(v) for v in labels)))
        known = []
        for j, sid in enumerate(ids):
            at = ctx.source.span_of(key if len(ids) == 1 and isinstance(
                step.default if label is None else step.cases[label], str) else (*key, j))
            member = ctx.steps.get(sid)
            if member is None and sid in ctx.unchecked_ids:  # its own findings say why
                continue
            if member is None or sid == step.id:
                hint = did_you_mean(sid, [s for s in [*ctx.steps, *ctx.unchecked_ids]
                                          if s != step.id])
                ctx.out.add("switch-case", f"{case_name(step.id, label)} runs "
                            + ("the switch itself" if sid == step.id else
                               f"unknown step '{sid}'" + suggest(hint)), at.start, at.end)
                continue
            if member.case is not None:
                ctx.out.add("switch-case", f"step '{sid}' already runs in {member.case}; a "
                            "step belongs to one case", at.start, at.end,
                            help="give the other case a step of its own")
                continue
            member.case, member.case_test = case_name(step.id, label), test
            # The case's steps read the value switched on (typed; `value:` itself must be there).
            member.uses.extend(Use(sid, u.ref, u.span, "guarded") for u in on_uses)
            known.append(sid)
        plan.cases.append((label, known))
        if known and known[-1] == ids[-1]:
            name = ctx.steps[known[-1]].step.output_name
            plan.results[name] = label
            results.append(Path(name))
    info.construct = plan
    if results:  # the join: typed and ordered after every case, never a missing read
        span = ctx.source.span_of((*base, "cases"), key=True)
        info.uses.append(Use(step.id, Ref(tuple(results)), span, "guarded"))


def output_type(ctx: Context, info: StepInfo) -> T.Type:
    from flowc.checks.conditions import ExprChecker

    step, plan = info.step, info.construct
    assert isinstance(step, SwitchStep)
    if not isinstance(plan, SwitchPlan):
        return T.ANY
    base = ("steps", info.index)
    on_type = ExprChecker(ctx, info, (*base, "value"), step.value).type_of(plan.on)
    for label in step.cases:
        at = ctx.source.span_of((*base, "cases", label), key=True)
        if on_type.kind != "any" and not T.comparable(T.of_value(label), on_type, "=="):
            ctx.out.add("type-mismatch", f"case {json.dumps(label)} is {T.of_value(label)}, "
                        f"but {step.value} is {on_type}: it can never match", at.start, at.end)
        elif on_type.values is not None and not any(
                label == v and isinstance(v, bool) == isinstance(label, bool)
                for v in on_type.values):
            hint = did_you_mean(str(label), [str(v) for v in on_type.values])
            ctx.out.add("not-in-enum", f"{json.dumps(label)} is not a value {step.value} can have"
                        + (f"; did you mean {json.dumps(hint)}?" if hint else ""),
                        at.start, at.end, help="its schema's enum: " + ", ".join(
                            json.dumps(v) for v in on_type.values))
    if on_type.values is not None:
        plan.unmatched = [v for v in on_type.values if v not in step.cases]
    plan.exhaustive = step.default is not None or plan.unmatched == []
    if step.default is not None and plan.unmatched == []:
        at = ctx.source.span_of((*base, "default"), key=True)
        ctx.out.add("unreachable-case", f"every value {step.value} can have has a case: the "
                    f"default of switch '{step.id}' never runs", at.start, at.end,
                    help="remove `default`, or the case it repeats")
    types = [ctx.output_types.get(name, T.ANY) for name in plan.results]
    return T.join(types) if types else T.ANY


def missing_reason(ctx: Context, info: StepInfo) -> str | None:
    """Why the switch's result may be missing though it ran: cases that do not cover every
    value, or a case whose result step may not run when the case is taken."""
    step, plan = info.step, info.construct
    if not isinstance(plan, SwitchPlan):
        return None
    if not plan.exhaustive:
        values = ", ".join(json.dumps(v) for v in plan.unmatched or ())
        return (f"switch '{step.id}' has no case for " + (values if values else
                "every value of its `value:`") + " and no `default`")
    for name, label in plan.results.items():
        member = ctx.steps[ctx.producers[name]]
        if member.runs_in_case != "always" or member.step.on_error == "continue":
            return (f"the result of {case_name(step.id, label)}, step '{member.step.id}', "
                    "may be missing even when the case is taken")
    return None


def same_case(ctx: Context, consumer: str | None, output_name: str) -> bool:
    """Whether ``consumer`` reads a step of its own case that runs whenever the case does."""
    producer = ctx.producers.get(output_name)
    if consumer is None or producer is None or consumer not in ctx.steps:
        return False
    p, c = ctx.steps[producer], ctx.steps[consumer]
    return p.case is not None and p.case == c.case and p.runs_in_case == "always" \
        and p.step.on_error != "continue"

"""`type: approval`: its output type, and the check of its proposed value against its
declared `schema:`. The runtime side is runtime/approval.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowc import types as T
from flowc.expr import Path, single_reference
from flowc.model import ApprovalStep

if TYPE_CHECKING:
    from collections.abc import Callable

    from flowc.context import Context, StepInfo


def output_type(ctx: Context, step: ApprovalStep,
                producer_type: Callable[[StepInfo], T.Type]) -> T.Type:
    """`schema:` when declared; else the type of the value put up for approval (a lone
    reference keeps its type, a template is text); with neither, true (a boolean)."""
    if step.schema_ is not None:
        return T.from_json_schema(step.schema_)
    if step.value is None:
        return T.BOOLEAN
    ref = single_reference(step.value)
    if ref is None:
        return T.STRING
    types = []
    for alt in ref.alts:
        if not isinstance(alt, Path):
            types.append(T.of_value(alt.value))
            continue
        types.append(_walk(_root_type(ctx, alt, step, producer_type), alt.segments
                           if alt.root != "input" else alt.segments[1:]))
    return T.join(types)


def _root_type(ctx: Context, path: Path, step: ApprovalStep,
               producer_type: Callable[[StepInfo], T.Type]) -> T.Type:
    if path.root == "input":
        name = path.segments[0] if path.segments else None
        spec = (ctx.inputs or {}).get(name) if isinstance(name, str) else None
        return T.Type(spec.type) if spec is not None else T.ANY
    sid = ctx.producers.get(path.root)
    if sid is None or sid == step.id:  # reported by the reference checks
        return T.ANY
    return producer_type(ctx.steps[sid])


def _walk(t: T.Type, segments: tuple[str | int, ...]) -> T.Type:
    """Quietly: a wrong path is reported where the reference is resolved."""
    for seg in segments:
        if t.kind == "any":
            return t
        if isinstance(seg, int):
            t = (t.items or T.ANY) if t.kind == "array" else T.ANY
        else:
            t = (t.field(seg) or T.ANY) if t.kind == "object" else T.ANY
    return t


def approval_label(step: ApprovalStep) -> str:
    """How `flowc graph` shows the step: what it waits for, and what it outputs."""
    text = " ".join(step.message.split())
    shown = text if len(text) <= 48 else text[:47] + "…"
    out = f"schema: {T.from_json_schema(step.schema_)}" if step.schema_ is not None else \
        f"value: {step.value}" if step.value is not None else "outputs true"
    return f"waits for approval: {shown}\n{out}"


def check_approvals(ctx: Context) -> None:
    """A value put up for approval whose type its declared `schema:` cannot hold."""
    for info in ctx.steps.values():
        step = info.step
        if not isinstance(step, ApprovalStep) or step.schema_ is None or step.value is None:
            continue
        declared = T.from_json_schema(step.schema_)
        ref = single_reference(step.value)
        given = T.STRING if ref is None else ctx.ref_types.get(ref, T.ANY)
        if _fits(given, declared):
            continue
        span = ctx.source.span_of((*ctx.step_path(step.id), "value"))
        ctx.out.add("approval-value",
                    f"approval step '{step.id}' puts up {_a(given)} for approval, but its "
                    f"`schema:` says {_a(declared)}", span.start, span.end,
                    help="make `schema:` describe the value, or put up a value of that type")


def _fits(given: T.Type, declared: T.Type) -> bool:
    if "any" in (given.kind, declared.kind) or given.kind == declared.kind:
        return True
    return given.kind == "integer" and declared.kind == "number"


def _a(t: T.Type) -> str:
    name = str(t)
    return ("an " if name[0] in "aeiou" else "a ") + name

"""`for_each:` (map) on a step: checked and typed here, run by runtime/foreach.py.

The step runs once per item of a list reference, the item bound to `as:` (`item` by
default). Its result is the list of the items' results in order; an item whose `when:` was
false, whose reads were missing (`on_missing: skip`) or that failed under
`on_error: continue` is null there. The list's type says an item may be missing (the list
may also be shorter than an index): `${results[0]}` needs a `??` fallback; the whole list
`${results}` does not (Jinja loops filter with `{% for r in results if r %}`).
"""

from __future__ import annotations

from typing import Any

from flowc import types as T
from flowc.context import Context, StepInfo
from flowc.expr import single_reference
from flowc.scopes import list_of

DEFAULT_CONCURRENCY = 10


def scan(ctx: Context, info: StepInfo, scan_template: Any) -> None:
    """Record the `for_each:` reference (first among the step's uses: its item's type is
    bound when it resolves, before the reads of the item)."""
    step = info.step
    base = ctx.step_path(step.id)
    if step.for_each is None:
        for name, shown in (("as_", "as"), ("max_concurrency", "max_concurrency")):
            if name in step.model_fields_set:
                span = ctx.source.span_of((*base, shown))
                ctx.out.add("invalid-value", f"`{shown}` is only used with `for_each`",
                            span.start, span.end,
                            help="add `for_each: ${...}` with the list to map over, or "
                                 f"remove `{shown}`")
        return
    text = step.for_each
    if single_reference(text) is None:
        span = ctx.source.span_of((*base, "for_each"))
        ctx.out.add("invalid-value", "`for_each` takes one reference to a list, such as "
                    "${input.docs}", span.start, span.end)
        return
    before = len(info.uses)
    scan_template(ctx, info, (*base, "for_each"), text)
    if len(info.uses) == before + 1:
        info.items = info.uses[-1].ref
    if step.as_ == "input" or step.as_ in ctx.producers:
        span = ctx.source.span_of((*base, "as"))
        what = "the pipeline's inputs" if step.as_ == "input" else f"the output '{step.as_}'"
        ctx.out.add("invalid-value", f"`as: {step.as_}` would hide {what}",
                    span.start, span.end, help="name the item something else")


def bind(ctx: Context, info: StepInfo) -> None:
    """After the `for_each:` reference resolved: the item's type, or a finding."""
    assert info.items is not None
    t = ctx.ref_types.get(info.items, T.ANY)
    if t.kind not in ("array", "any"):
        use = next(u for u in info.uses if u.ref is info.items)
        article = "an" if str(t)[0] in "aeiou" else "a"
        ctx.out.add("for-each-not-a-list",
                    f"`for_each` needs a list; '{_shown(info)}' is {article} {t}",
                    use.span.start, use.span.end,
                    help="map over an array: an input of `type: array`, or a schema's "
                         "array field")
    info.locals[info.step.as_] = (t.items or T.ANY) if t.kind == "array" else T.ANY


def _shown(info: StepInfo) -> str:
    assert info.items is not None
    return " ?? ".join(str(a) for a in info.items.alts)


def result_type(ctx: Context, info: StepInfo, body: T.Type) -> T.Type:
    """A list of the body's results. An item read by index may be missing: the list may be
    shorter (its length is the mapped list's), or the item was skipped or failed."""
    return list_of(body, True)

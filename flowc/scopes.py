"""Names a single step reads besides inputs and outputs: the item of its `for_each:` and
`self` in a `repeat:`. They resolve before outputs (so `as: doc` may not hide an output),
make no edge in the DAG, and are typed like any other reference."""

from __future__ import annotations

from flowc import types as T
from flowc.context import Context, StepInfo, Use
from flowc.expr import Path

SELF = "self"


def self_type(info: StepInfo, until: bool) -> T.Type:
    """`self` inside a repeated step: the last attempt's answer as text and what was wrong
    with it (both missing on the first attempt), the attempt's number; in `until:`, also
    this attempt's answer, typed as the step's result."""
    fields: list[tuple[str, T.Type]] = [("previous", T.STRING), ("error", T.STRING),
                                        ("attempt", T.INTEGER)]
    if until:
        fields.append(("output", info.locals.get("__output__", T.ANY)))
    return T.Type("object", fields=tuple(fields), optional=frozenset({"previous", "error"}))


def local_type(ctx: Context, use: Use, root: str) -> T.Type | None:
    """The type of ``root`` if it is a name the reading step binds itself, else None."""
    info = ctx.steps.get(use.consumer) if use.consumer is not None else None
    if info is None:
        return None
    if root == SELF and info.step.repeat is not None and use.kind != "condition":
        return self_type(info, use.kind == "until")
    if info.items is not None and root == info.step.as_ and use.ref is not info.items:
        return info.locals.get(root, T.ANY)
    return None


def root_type(ctx: Context, use: Use, root: str) -> T.Type:
    """A reference root's type: a step-local name's, a value's from around a block (an
    outer step's, the item, `self`), or the output's."""
    local = local_type(ctx, use, root)
    if local is not None:
        return local
    if root not in ctx.producers and root in ctx.outer:
        return ctx.outer[root]
    return ctx.output_types.get(root, T.ANY)


def missing_reason(path: Path, absent: str) -> str | None:
    """Why a part of a step-local value or of a list may be missing (for `maybe-skipped`)."""
    if absent.startswith("["):
        return (f"item {absent} of '{path.root}' may be missing: the for_each list may be "
                "shorter, or that item was skipped or failed")
    if path.root == SELF:
        return f"'self.{absent}' is missing on the first attempt"
    return None


def list_of(item: T.Type, may_miss: bool) -> T.Type:
    """The type of a `for_each` step's result: a list of its body's results."""
    return T.Type("array", items=item,
                  optional=frozenset({T.ITEM_MAY_BE_MISSING}) if may_miss else frozenset())

"""`type: block`: steps written inline, checked and typed here, run by runtime/block.py.

A block is an inline sub-pipeline (flowc/subpipeline.py): its steps are checked by the same
checks as a pipeline's, in a context of their own whose findings land at their place in this
file. Its inputs are the names its steps read from around it: the pipeline's inputs, the
`for_each` item, `self` of its `repeat:`, and steps before it (those become its
dependencies). Its steps are not visible outside it; its result is its `output:`, typed as a
sub-pipeline's is from its callee's `output:`.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from flowc import types as T
from flowc.context import Context, StepInfo, Use
from flowc.diagnostics import Severity
from flowc.expr import Literal, Node, Path, Ref, references
from flowc.model import BlockStep
from flowc.scopes import SELF, local_type, self_type

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # a pipeline's `name:`


@dataclass
class Block:
    """What the compiler keeps of a block while checking it (``StepInfo.construct``); the
    runtime gets ``reads`` (``StepNode.construct``) and the compiled steps
    (``StepNode.callee``)."""

    inner: Context
    reads: tuple[str, ...] = ()  # names read from around the block, in first-read order
    errors: int = 0  # errors in the file before its steps were checked
    typed: bool = False  # its steps typed; their skip check waits for the file's


class _Within:
    """The enclosing file seen from a block: the paths of its steps' fields are relative to
    the block (`("steps", 0, "prompt")`), as in a pipeline file of their own."""

    def __init__(self, source: Any, prefix: tuple[Any, ...]) -> None:
        self._source, self._prefix = source, prefix

    def span_of(self, path: tuple[Any, ...], *, key: bool = False) -> Any:
        return self._source.span_of((*self._prefix, *path), key=key)

    def span_in_value(self, path: tuple[Any, ...], value: str, offset: int, length: int
                      ) -> Any:
        return self._source.span_in_value((*self._prefix, *path), value, offset, length)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)


def _errors(ctx: Context) -> int:
    return sum(1 for d in ctx.out.results() if d.severity is Severity.ERROR)


def collect(ctx: Context, info: StepInfo) -> None:
    """Check the block's steps as a pipeline's and record, as the block's own reads, what
    they read from around it."""
    from flowc.checks.references import collect_uses
    from flowc.checks.structure import check_structure

    step = info.step
    assert isinstance(step, BlockStep)
    out = copy.copy(ctx.out)  # the same findings, placed through the block's paths
    out.source = _Within(ctx.source, ctx.step_path(step.id))  # type: ignore[assignment]
    name = ctx.raw.get("name")  # the pipeline's (its cached results are filed under it)
    raw = {"name": name if isinstance(name, str) and re.match(NAME, name) else "block",
           "steps": list(step.steps), "output": step.output}
    inner = Context(out.source, out, raw, ctx.config, ctx.catalog)  # type: ignore[arg-type]
    # Its `type: pipeline` steps find callees as the file's own do (a registered pipeline's
    # in the project's pipelines folder, by name among those served), not from the cwd.
    inner.pipelines, inner.pipelines_dir = ctx.pipelines, ctx.pipelines_dir
    inner.output_label = f"the output of block '{step.id}'"
    block = info.construct = Block(inner, errors=_errors(ctx))
    inner.outer = dict.fromkeys(_visible(ctx, info), T.ANY)  # typed once resolved
    inner.bound = {**ctx.bound, **_bound(step)}
    check_structure(inner)
    inner.inputs, inner.input_types = ctx.inputs, ctx.input_types
    raw["inputs"] = ctx.raw.get("inputs")  # the compiled block declares them (`flowc cost`)
    for sid, inner_info in inner.steps.items():
        ctx.inner_names.setdefault(inner_info.step.output_name, step.id)
        if inner_info.step.type == "approval":
            span = inner.source.span_of((*inner.step_path(sid), "type"))
            ctx.out.add("block-approval", f"approval step '{sid}' cannot be inside block "
                        f"'{step.id}': a run waits for approvals at its top level",
                        span.start, span.end, help="put the approval step before or after "
                                                   "the block")
        hidden = inner.bound.get(inner_info.step.output_name)
        if hidden is not None:  # a run would read the bound name there, not the step
            span = inner.source.span_of((*inner.step_path(sid), "id"))
            ctx.out.add("invalid-value", f"step '{sid}' would hide {hidden}", span.start,
                        span.end, help="give the step another id" + (
                            "" if inner_info.step.output_name == SELF
                            else ", or the item another name (`as:`)"))
    collect_uses(inner)
    reads: dict[str, None] = {}
    for use in [u for i in inner.steps.values() for u in i.uses] + inner.output_uses:
        outer = _outer_read(inner, use, step.id)
        if outer is not None:
            info.uses.append(outer)
            reads.update(dict.fromkeys(a.root for a in outer.ref.alts if isinstance(a, Path)))
    block.reads = tuple(reads)


def _visible(ctx: Context, info: StepInfo) -> list[str]:
    """Names the block's steps may read from around it (besides `input`)."""
    step = info.step
    names = [*ctx.outer, *ctx.producers, *ctx.unchecked_outputs]
    if step.for_each is not None:
        names.append(step.as_)
    if step.repeat is not None:
        names.append(SELF)
    return names  # its own result too: a read of it is a cycle, reported as one


def _bound(step: BlockStep) -> dict[str, str]:
    """The names a run of the block binds for its steps (runtime/frame.py), which win over
    a step of the same id there: its item, `self` of its `repeat:`."""
    out: dict[str, str] = {}
    if step.for_each is not None:
        out[step.as_] = f"the item '{step.as_}' of block '{step.id}'"
    if step.repeat is not None:
        out[SELF] = f"`self` of block '{step.id}' (its `repeat:`)"
    return out


def _outer_read(inner: Context, use: Use, block: str) -> Use | None:
    """The part of an inner reference that reads around the block, as the block's own read:
    typed, made a dependency and checked for missing values there. A reference that also
    falls back to an inner value is guarded (its inner part decides)."""
    outer: list[Path | Literal] = []
    inside = False
    for alt in use.ref.alts:
        if isinstance(alt, Literal) or _is_outer(inner, use, alt.root):
            outer.append(alt)
        else:
            inside = True
    if not any(isinstance(a, Path) for a in outer):
        return None
    kind = "guarded" if inside or use.kind == "guarded" else "data"
    return Use(block, Ref(tuple(outer)), use.span, kind, use.jinja)  # type: ignore[arg-type]


def _is_outer(inner: Context, use: Use, root: str) -> bool:
    return (root != "input" and root not in inner.producers
            and root not in inner.unchecked_outputs and root in inner.outer
            and local_type(inner, use, root) is None)


def output_type(ctx: Context, info: StepInfo) -> T.Type:
    """Once the block's own reads are typed: its steps are resolved and typed with those
    types, and its result typed from its `output:`. Their missing values are checked when
    the file's are (`check_steps`)."""
    from flowc.checks.references import _resolve
    from flowc.compiler import check_typed
    from flowc.foreach import result_type
    from flowc.subpipeline import output_type_of

    block = info.construct
    if not isinstance(block, Block) or block.typed:  # typed already
        return ctx.output_types.get(info.step.output_name, T.ANY)
    block.typed = True
    inner, step = block.inner, info.step
    for name in inner.outer:
        if step.for_each is not None and name == step.as_:
            inner.outer[name] = info.locals.get(name, T.ANY)
        elif step.repeat is not None and name == SELF:
            inner.outer[name] = self_type(info, False)
        else:
            inner.outer[name] = ctx.outer.get(name) or ctx.output_types.get(name, T.ANY)
    check_typed(inner)
    body = output_type_of(inner)
    info.locals["__output__"] = body  # `${self.output}` in `repeat: {until:}`
    for use in info.uses:
        if use.kind == "until":  # typed again, now that the block's result is known
            _resolve(ctx, use)
    return result_type(ctx, info, body) if step.for_each is not None else body


def check_steps(ctx: Context, info: StepInfo, status: dict[str, str],
                reason: dict[str, str], guard: dict[str, Node]) -> None:
    """The block's steps' missing values and the checks after, once the file's skip check
    has the statuses of the values the block reads (``status``: output name -> always,
    maybe, never; ``reason``, ``guard`` as flow.check_skips keeps them); then its steps
    are compiled. A step's `${a ?? b}` falls back from an outside value to one of a step:
    the reference as a whole is checked here, so ``a`` starts as it may be missing."""
    from flowc.compiler import _build, check_flow
    from flowc.constructs.switch import same_case

    block = info.construct
    if not isinstance(block, Block) or not block.typed:
        return
    inner, sid = block.inner, info.step.id
    there = _present(info)
    inner.around = {
        name: (status[name], reason.get(name, ""), _guard(inner, guard.get(name)))
        for name in inner.outer if status.get(name, "always") != "always"
        and name not in inner.producers and name not in there
        and not same_case(ctx, sid, name)}
    check_flow(inner)
    if _errors(ctx) == block.errors and inner.acyclic:
        try:
            info.callee = _build(inner, ctx.source.path)
            info.construct = block.reads  # what the runtime needs (`StepNode.construct`)
        except ValidationError:  # the file's own `inputs:` are wrong: reported there
            pass


def _guard(inner: Context, condition: Node | None) -> Node | None:
    """An outside step's `when:` as a guard inside the block (the other side of an if/else
    there): unless it reads a name a step of the block takes for itself inside it."""
    if condition is None or any(isinstance(a, Path) and a.root in inner.producers
                                for ref in references(condition) for a in ref.alts):
        return None
    return condition


def _present(info: StepInfo) -> set[str]:
    """Outside values there whenever the block runs: each one the block (or one of its
    steps) reads with no fallback. If one may be missing, the file's check says so where
    the block reads it, or the block is skipped (`on_missing: skip`) before it starts."""
    there: set[str] = set()
    for use in info.uses:
        roots = {a.root for a in use.ref.alts if isinstance(a, Path)}
        if use.kind not in ("guarded", "until") and len(roots) == 1 \
                and all(isinstance(a, Path) for a in use.ref.alts):
            there |= roots
    return there


def read_around(ctx: Context, use: Use) -> bool:
    """Whether a reference in a block's steps reads only values from around it (and
    literals): the enclosing file's check covers it, as the block's own read."""
    if not ctx.outer:
        return False
    paths = [a for a in use.ref.alts if isinstance(a, Path)]
    return bool(paths) and all(_is_outer(ctx, use, a.root) for a in paths)


def missing_reason(ctx: Context, info: StepInfo) -> str | None:
    return None  # a block that ran has its `output:` (or failed)


def inner_hint(ctx: Context, name: str) -> tuple[str, str] | None:
    """For a read of a block's inner step from outside it: the message's tail and help."""
    block = ctx.inner_names.get(name)
    if block is None:
        return None
    info = ctx.steps[block]
    out = info.step.output  # type: ignore[union-attr]
    field = isinstance(out, dict) and any(v.strip() == f"${{{name}}}" for v in out.values())
    key = next((k for k, v in out.items() if v.strip() == f"${{{name}}}"), name) \
        if isinstance(out, dict) else name
    at = f"{block}[0].{key}" if info.step.for_each is not None else f"{block}.{key}"
    return (f": '{name}' is a step inside block '{block}', not visible outside it",
            f"read it through the block's result: ${{{at}}}" if field else
            f"add it to block '{block}'s `output:` ({key}: ${{{name}}}) and read "
            f"${{{at}}}")

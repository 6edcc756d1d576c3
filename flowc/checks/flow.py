"""Control flow: cycles, skip propagation (the join rule), unreachable and unused steps.

The join rule: a value is *missing* when its producer was skipped (its `when:` was false,
or it skipped itself because a value it reads was missing) or failed under
`on_error: continue`. A read of a value that may be missing needs a fallback
(`${a ?? b}`: the first alternative that has a value), or the reading step says
`on_missing: skip` and is skipped with it. A fallback may also be the other side of an
if/else: `${a ?? b}` where `a`'s step has `when: C` and `b`'s has `when: not (C)` is always
present. `needs:` only orders: it waits for a step to finish or be skipped.
"""

from __future__ import annotations

from flowc import constructs
from flowc import types as T
from flowc.context import Context, Use
from flowc.dag import cyclic_components, shortest_cycle, topological_order, with_ancestors
from flowc.expr import BoolOp, Call, Compare, Literal, Node, Not, Path, Ref
from flowc.scopes import missing_reason, root_type

_RANK = {"always": 0, "maybe": 1, "never": 2}
_OWN_CONDITION = "it has a `when:` condition"


def check_cycles(ctx: Context) -> None:
    g = ctx.graph
    order = {sid: info.index for sid, info in ctx.steps.items()}
    found = topological_order(g, order.__getitem__)
    if found is not None:  # the common case: one pass, and the order the DAG keeps
        ctx.order = found
        return
    ctx.acyclic = False
    for comp in cyclic_components(g):
        first = min(comp, key=order.__getitem__)
        cycle = shortest_cycle(g, first, comp)
        names = " -> ".join(f'"{n}"' for n in [*cycle, cycle[0]])
        # Point at the reference in the first step that reads its predecessor.
        prev = cycle[-1]
        uses = g.edges[prev, first].get("uses") or []
        span = uses[0].span if uses else ctx.source.span_of((*ctx.step_path(first), "needs"))
        ctx.out.add("cycle", f"steps depend on each other in a cycle: {names}",
                    span.start, span.end,
                    help="a step can only read outputs of steps that do not depend on it")


def check_skips(ctx: Context) -> None:
    """Propagate `always`/`maybe`/`never` through the DAG; report unguarded reads. In a
    block, a value from around it starts as the enclosing file's check found it
    (`ctx.around`); a reference that reads only such values is checked there."""
    if not ctx.acyclic:
        for info in ctx.steps.values():  # a block's steps still get their checks
            constructs.check_inner(ctx, info, {}, {}, {})
        return
    # output name -> always | maybe | never; why; the condition that alone may skip it
    status = {name: s for name, (s, _, _) in ctx.around.items()}
    reason = {name: why for name, (_, why, _) in ctx.around.items()}
    guard: dict[str, Node] = {name: g for name, (_, _, g) in ctx.around.items()
                              if g is not None}
    for sid in ctx.order:
        info = ctx.steps[sid]
        constructs.check_inner(ctx, info, status, reason, guard)  # its reads are known
        step = info.step
        runs = "always"
        why = None
        if info.constant is False:
            runs, why = "never", "its condition is always false"
        elif info.condition is not None and info.constant is not True and info.items is None:
            runs, why = "maybe", _OWN_CONDITION
        own_only = True  # skipped by its own condition alone (a guard for if/else joins)
        for use in info.uses:
            if use.kind == "guarded" or (ctx.outer and constructs.read_around(ctx, use)):
                continue
            avail, missing = _availability(ctx, use, status, guard)
            if avail == "always":
                continue
            if step.on_missing == "skip":
                own_only = False
                if _RANK[avail] > _RANK[runs] or runs == "always":
                    runs = max(runs, avail, key=_RANK.__getitem__)
                    why = f"it reads {_first_path(use)}, which " + (
                        "is never produced" if avail == "never" else "may be missing")
                elif why == _OWN_CONDITION:
                    why += f" and reads {_first_path(use)}, which may be missing"
            else:
                _report_unguarded(ctx, use, missing, reason, avail)
        if info.case is not None:  # a switch case's step runs only when the case is taken
            info.runs_in_case, own_only = runs, False
            if runs == "always":
                runs, why = "maybe", f"it runs only when {info.case} is taken"
        info.runs = runs  # type: ignore[assignment]
        info.skip_reason = why
        name = step.output_name
        if runs == "never":
            status[name] = "never"
            reason[name] = f"step '{sid}' never runs ({why})"
        elif runs == "maybe" or (step.on_error == "continue" and info.items is None):
            status[name] = "maybe"
            reason[name] = (f"step '{sid}' may be skipped ({why})" if runs == "maybe"
                            else f"step '{sid}' may fail without failing the run "
                                 "(on_error: continue)")
        else:
            status[name] = "always"
        missing = constructs.missing_reason(ctx, info)
        if missing is not None and status[name] == "always":
            status[name], reason[name] = "maybe", missing
        if runs == "maybe" and own_only and step.on_error != "continue":
            guard[name] = info.condition  # type: ignore[assignment]
        if runs == "never" and info.constant is not False:
            span = ctx.source.span_of((*ctx.step_path(sid), "id"))
            ctx.out.add("unreachable-step", f"step '{sid}' can never run: {why}",
                        span.start, span.end)
    for use in ctx.output_uses:
        if use.kind == "guarded" or (ctx.outer and constructs.read_around(ctx, use)):
            continue
        avail, missing = _availability(ctx, use, status, guard)
        if avail != "always":
            _report_unguarded(ctx, use, missing, reason, avail)


def _first_path(use: Use) -> str:
    for alt in use.ref.alts:
        if isinstance(alt, Path):
            return f"'{alt}'"
    return "a value"


def _availability(ctx: Context, use: Use, status: dict[str, str],
                  guard: dict[str, Node]) -> tuple[str, list[str]]:
    """The best availability among a reference's alternatives, and the names that may be
    missing (``input.x`` for optional inputs).

    Two alternatives whose producers are guarded by ``c`` and ``not c`` (and nothing else)
    make the reference always available: exactly one of those branches runs."""
    best = "never"
    culprits: list[str] = []
    for alt in use.ref.alts:
        if isinstance(alt, Literal):
            return "always", culprits
        if alt.root == "input":
            spec = (ctx.inputs or {}).get(str(alt.segments[0])) if alt.segments else None
            avail = "maybe" if spec is not None and not spec.is_required \
                and spec.default is None else "always"
            name = "input." + str(alt.segments[0]) if alt.segments else "input"
            if avail == "always" and spec is not None and len(alt.segments) > 1:
                absent = _absent(ctx, use, alt)
                if absent is not None:  # a field the input's `required:` does not list
                    avail, name = "maybe", str(alt)
        else:
            avail, name = status.get(alt.root, "always"), alt.root
            if avail == "maybe" and constructs.same_case(ctx, use.consumer, alt.root):
                avail = "always"
            # A field that may have no value even when its step ran is named as itself: its
            # step's `when:` (below) then cannot make the alternatives cover each other.
            if _absent(ctx, use, alt) is not None:
                avail, name = ("maybe" if avail == "always" else avail), str(alt)
        if avail == "always":
            return "always", culprits
        culprits.append(name)
        if _RANK[avail] < _RANK[best]:
            best = avail
    conditions = [guard[n] for n in culprits if n in guard]
    for c in conditions:
        if any(o == Not(c) or c == Not(o) for o in conditions):
            return "always", []
    return best, culprits


def _optional_reason(ctx: Context, use: Use, name: str) -> str | None:
    for alt in use.ref.alts:
        if not isinstance(alt, Path) or str(alt) != name:
            continue
        on_input = alt.root == "input"
        absent = _absent(ctx, use, alt)
        producer = ctx.producers.get(alt.root)
        if absent is None:
            continue
        item = _list_item(ctx, use, alt)
        if item is not None:
            return item
        if on_input:
            return (f"field '{absent}' of input '{alt.segments[0]}' may be left out (its "
                    "`required:` does not list it, or its schema allows null)")
        if missing_reason(alt, absent):
            return missing_reason(alt, absent)
        if producer is not None and ctx.steps[producer].step.type == "transform":
            return (f"field '{absent}' may have no value (its expression may be null: "
                    "get() without a default, min/max of an empty array, from_json)")
        return (f"field '{absent}' may be null or left out (its schema allows null, "
                "or does not list it in `required`)")
    return None


def _missing_part(ctx: Context, use: Use, alt: Path) -> tuple[str, str, int] | None:
    """The first part of ``alt`` that may be absent (types.missing_part), an index counted
    as there when the reading step's `when:` proves its list long enough."""
    on_input = alt.root == "input"
    segments = alt.segments[1:] if on_input else alt.segments
    lengths = _guarded_lengths(ctx.steps[use.consumer].condition) \
        if use.consumer is not None and use.kind == "data" else {}
    known = {at: lengths[str(Path(alt.root, alt.segments[:at + on_input]))]
             for at, seg in enumerate(segments) if isinstance(seg, int)
             and str(Path(alt.root, alt.segments[:at + on_input])) in lengths}
    t = ctx.input_type(str(alt.segments[0])) if on_input else root_type(ctx, use, alt.root)
    return T.missing_part(t, segments, known)


def _absent(ctx: Context, use: Use, alt: Path) -> str | None:
    found = _missing_part(ctx, use, alt)
    return None if found is None else found[0]


_AT_LEAST = {">": 1, ">=": 0, "==": 0}  # `length(x) OP n`: x has at least n + this items
_FLIPPED = {"<": ">", "<=": ">=", "==": "=="}


def _guarded_lengths(condition: Node | None) -> dict[str, int]:
    """What a step's `when:` proves about lists' lengths when it holds: each
    `length(${x}) > n` (`>=`, `==`, `len`, either way round) joined by `and`, as the
    least number of items of ``x``. The step's data reads come after its condition held."""
    if isinstance(condition, BoolOp) and condition.op == "and":
        left, right = _guarded_lengths(condition.left), _guarded_lengths(condition.right)
        return {k: max(left.get(k, 0), right.get(k, 0)) for k in {*left, *right}}
    if not isinstance(condition, Compare):
        return {}
    op, call, n = condition.op, condition.left, condition.right
    if isinstance(n, Call) and op in _FLIPPED:
        op, call, n = _FLIPPED[op], n, call
    if op not in _AT_LEAST or not isinstance(call, Call) or call.name not in ("length", "len") \
            or len(call.args) != 1 or not isinstance(n, Literal) or isinstance(n.value, bool) \
            or not isinstance(n.value, int):
        return {}
    ref = call.args[0]
    if not isinstance(ref, Ref) or len(ref.alts) != 1 or not isinstance(ref.alts[0], Path):
        return {}
    return {str(ref.alts[0]): n.value + _AT_LEAST[op]}


def _list_item(ctx: Context, use: Use, alt: Path) -> str | None:
    """Why an index into a list typed by a schema or an input may have no item (a map's
    result has its own reason: scopes.missing_reason)."""
    on_input = alt.root == "input"
    found = _missing_part(ctx, use, alt)
    if found is None or found[1] == "field":
        return None
    part, why, at = found
    producer = None if on_input else ctx.producers.get(alt.root)
    if why == "item" and at == 0 and producer is not None \
            and getattr(ctx.steps[producer].step, "for_each", None) is not None:
        return None
    listed = Path(alt.root, alt.segments[:at + on_input])
    if why == "item":
        return f"item {part} of '{listed}' may be null (its schema's `items` allow null)"
    least = "its `min_items`" if on_input and at == 0 else "its schema's `minItems`"
    return f"'{listed}' may have no item {part} (the list may be shorter: neither {least} " \
           "nor the step's `when:` on its length rules that out)"


def _report_unguarded(ctx: Context, use: Use, names: list[str], reason: dict[str, str],
                      avail: str) -> None:
    if not names:
        return
    why = "; ".join(
        f"optional input '{n[6:]}' has no default" if n.startswith("input.") and "." not in
        n[6:] and "[" not in n[6:] else reason.get(n) or _optional_reason(ctx, use, n)
        or f"the producer of '{n}' may be skipped" for n in names)
    name = " ?? ".join(names)
    alts = " ?? ".join(str(a) for a in use.ref.alts if isinstance(a, Path))
    where = ctx.output_label if use.consumer is None else f"step '{use.consumer}'"
    fix = (f"add a fallback: {{{{ {alts} | default(<default>, true) }}}}" if use.jinja
           else f"add a fallback: ${{{alts} ?? <default>}}")
    if use.consumer is not None:
        fix += f", or set `on_missing: skip` on step '{use.consumer}'"
    verb = "is never produced" if avail == "never" else "may be missing"
    ctx.out.add("maybe-skipped", f"'{name}' {verb} when {where} reads it: {why}",
                use.span.start, use.span.end, help=fix)


def check_usage(ctx: Context) -> None:
    """Warn about outputs nobody reads and steps that do not contribute to the output."""
    if not ctx.acyclic or ctx.unchecked_outputs or ctx.partial:
        return  # a step with errors may read anything: warnings here would be guesses
    read: set[str] = set()
    for info in ctx.steps.values():
        for use in info.uses:
            read.update(a.root for a in use.ref.alts if isinstance(a, Path))
    for use in ctx.output_uses:
        read.update(a.root for a in use.ref.alts if isinstance(a, Path))
    raw_output = ctx.raw.get("output") if isinstance(ctx.raw, dict) else None
    has_output = isinstance(raw_output, str) or (
        isinstance(raw_output, dict) and all(isinstance(v, str) for v in raw_output.values()))
    contributing: set[str] = set()
    if has_output:
        produced = {ctx.producer_of(alt) for use in ctx.output_uses for alt in use.ref.alts
                    if isinstance(alt, Path)}
        contributing = with_ancestors(ctx.graph, {s for s in produced if s is not None})
    for sid, info in ctx.steps.items():
        step = info.step
        if info.runs == "never":
            continue
        if step.output == step.output_name and step.output not in read and (
                has_output or _is_read_by_needs(ctx, sid)):
            span = ctx.source.span_of((*ctx.step_path(sid), "output"))
            ctx.out.add("unused-output",
                        f"output '{step.output}' of step '{sid}' is never used",
                        span.start, span.end,
                        help="read it with ${" + step.output + "}, or drop `output:`")
        elif has_output and sid not in contributing:
            span = ctx.source.span_of((*ctx.step_path(sid), "id"))
            ctx.out.add("unused-step",
                        f"step '{sid}' does not contribute to {ctx.output_label}",
                        span.start, span.end,
                        help="read its result in a later step or in `output:`, or remove it")


def _is_read_by_needs(ctx: Context, sid: str) -> bool:
    return any(ctx.graph.edges[sid, s].get("order") for s in ctx.graph.successors(sid))


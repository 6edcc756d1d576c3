"""References: every `${...}` is found, parsed, resolved to an input or an output, and typed."""

from __future__ import annotations

import re
from typing import Any

from flowc import approval, constructs
from flowc import types as T
from flowc.context import Context, StepInfo, Use
from flowc.expr import ExprSyntaxError, Literal, Path, Ref, parse_condition, references
from flowc.model import ApprovalStep, LLMStep, MCPToolStep, PromptFile
from flowc.prompt_files import read_prompt_file
from flowc.scopes import local_type
from flowc.source import Span
from flowc.template import Template, jinja_reads, parse_template
from flowc.validate import did_you_mean, suggest


def collect_uses(ctx: Context) -> None:
    """Parse every template, param and condition; record each reference as a :class:`Use`."""
    for info in ctx.steps.values():
        step = info.step
        base = ("steps", info.index)
        constructs.scan(ctx, info, _scan_template, _scan_params)
        if isinstance(step, LLMStep):
            for name in ("prompt", "system"):
                text = getattr(step, name)
                if isinstance(text, PromptFile):  # read, then checked as an inline one
                    text = read_prompt_file(ctx, (*base, name), text.file)
                if text is not None:
                    template = _scan_template(ctx, info, (*base, name), text)
                    if template is not None:
                        info.templates[name] = template
        elif isinstance(step, MCPToolStep):
            info.params = _scan_params(ctx, info, (*base, "params"), step.params)
        elif isinstance(step, ApprovalStep):
            for name in ("message", "value"):
                text = getattr(step, name)
                if text is not None:
                    template = _scan_template(ctx, info, (*base, name), text)
                    if template is not None:
                        info.templates[name] = template
        else:
            constructs.collect(ctx, info)
        if isinstance(step.when, str):
            _parse_condition(ctx, info, (*base, "when"), step.when)
        elif isinstance(step.when, bool):
            info.constant = step.when
    _collect_output(ctx)


def _scan_template(ctx: Context, info: StepInfo | None, path: tuple[Any, ...],
                   text: str, kind: str = "data") -> Template | None:
    """Record the template's references; returns it parsed, or None if it cannot be."""
    template = parse_template(text)
    consumer = info.step.id if info else None
    for part in template.parts:
        span = ctx.value_span(path, text, part.start, part.end)
        if part.error is not None:
            at = ctx.value_span(path, text, part.error.offset, part.error.offset + 1)
            ctx.out.add("reference-syntax", f"invalid reference: {part.error.message}",
                        at.start, at.end)
            continue
        ctx_use = Use(consumer, part.ref, span, kind)  # type: ignore[arg-type]
        if info is not None:
            info.uses.append(ctx_use)
        else:
            ctx.output_uses.append(ctx_use)
    if template.uses_jinja:
        from jinja2 import TemplateSyntaxError

        try:
            reads = jinja_reads(template)
        except TemplateSyntaxError as exc:
            lines = text.splitlines(keepends=True)
            offset = sum(len(x) for x in lines[: max(0, (exc.lineno or 1) - 1)])
            at = ctx.value_span(path, text, offset, offset + 1)
            ctx.out.add("template-syntax", f"invalid Jinja2 template: {exc.message}",
                        at.start, at.end)
            return None
        uses = info.uses if info else ctx.output_uses
        for (root, *segments), guarded in dict.fromkeys(reads):
            span = _jinja_span(ctx, path, text, str(root), segments)
            read = Ref((Path(str(root), tuple(segments)),))
            if guarded and segments:
                # `{{ a.x | default(..) }}`: `a` must be there, `x` may be missing.
                uses.append(Use(consumer, Ref((Path(str(root), tuple(segments[:-1])),)),
                                span, kind, jinja=True))  # type: ignore[arg-type]
            uses.append(Use(consumer, read, span, "guarded" if guarded else kind,  # type: ignore[arg-type]
                            jinja=True))
    return template


def _jinja_span(ctx: Context, path: tuple[Any, ...], text: str, root: str,
                segments: list[str | int]) -> Span:
    """Where a Jinja read stands: its dotted form when written so, else its root name."""
    dotted = re.escape(root) + "".join(
        r"\s*\.\s*" + re.escape(s) if isinstance(s, str) else r"\s*\[\s*" + str(s) + r"\s*\]"
        for s in segments)
    m = re.search(r"\b" + dotted + r"\b", text) if segments else None
    m = m or re.search(r"\b" + re.escape(root) + r"\b", text)
    start, end = (m.start(), m.end()) if m else (0, len(root))
    return ctx.value_span(path, text, start, end)


def _scan_params(ctx: Context, info: StepInfo, path: tuple[Any, ...], value: Any) -> Any:
    """Record the params' references; returns the params with each string that holds a
    reference parsed into a Template, so the runtime never parses them."""
    if isinstance(value, str):
        template = _scan_template(ctx, info, path, value)
        return template if template is not None and "${" in value else value
    if isinstance(value, dict):
        return {k: _scan_params(ctx, info, (*path, k), v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scan_params(ctx, info, (*path, i), v) for i, v in enumerate(value)]
    return value


def _parse_condition(ctx: Context, info: StepInfo, path: tuple[Any, ...], text: str) -> None:
    try:
        node = parse_condition(text)
    except ExprSyntaxError as exc:
        at = ctx.value_span(path, text, exc.offset, exc.offset + 1)
        ctx.out.add("condition-syntax", f"invalid condition: {exc.message}", at.start, at.end)
        return
    info.condition = node
    for ref in references(node):
        span = ctx.value_span(path, text, *ref.span)
        info.uses.append(Use(info.step.id, ref, span, "condition"))


def _collect_output(ctx: Context) -> None:
    raw = ctx.raw.get("output") if isinstance(ctx.raw, dict) else None
    if isinstance(raw, str):
        _scan_template(ctx, None, ("output",), raw, "output")
    elif isinstance(raw, dict):
        for key, value in raw.items():
            if isinstance(value, str):
                _scan_template(ctx, None, ("output", key), value, "output")


# -- resolution and types ----------------------------------------------------------------------
def resolve_uses(ctx: Context) -> None:
    """Report references to undefined names and bad field paths; add data edges."""
    for info in ctx.steps.values():
        if info.step.output_name not in ctx.output_types:  # an approval may have typed it
            ctx.output_types[info.step.output_name] = constructs.step_type(ctx, info,
                                                                           output_type)
    g = ctx.graph
    for info in ctx.steps.values():
        g.add_node(info.step.id)
    for info in _typing_order(ctx):
        for use in info.uses:
            for producer in _resolve(ctx, use):
                _add_edge(ctx, producer, info.step.id, use)
            if use.ref is info.items:  # the item's type, before the reads of it
                constructs.foreach.bind(ctx, info)
        derived = constructs.output_type(ctx, info)  # typed from what it reads, just typed
        if derived is not None:
            ctx.output_types[info.step.output_name] = derived
        for need in info.step.needs:
            if need in ctx.steps:
                if need == info.step.id:
                    span = ctx.source.span_of((*ctx.step_path(need), "needs"))
                    ctx.out.add("cycle", f"step '{need}' needs itself", span.start, span.end)
                    continue
                g.add_edge(need, info.step.id, order=True)
            elif need not in ctx.unchecked_ids:  # an invalid step's own findings say why
                idx = info.step.needs.index(need)
                span = ctx.source.span_of((*ctx.step_path(info.step.id), "needs", idx))
                hint = did_you_mean(need, [*ctx.steps, *ctx.unchecked_ids])
                ctx.out.add("unknown-step", f"`needs` names unknown step '{need}'"
                            + suggest(hint),
                            span.start, span.end)
    for use in ctx.output_uses:
        _resolve(ctx, use)


def _typing_order(ctx: Context) -> list[StepInfo]:
    """The steps in file order, except that a step whose type comes from what it reads (a
    transform, a switch) comes after the producers of its reads: its readers see its type."""
    order: list[StepInfo] = []
    seen: set[str] = set()
    for first in ctx.steps:
        stack = [(first, False)]
        while stack:
            sid, expanded = stack.pop()
            if expanded:
                order.append(ctx.steps[sid])
                continue
            if sid in seen:
                continue
            seen.add(sid)
            stack.append((sid, True))
            for use in reversed(ctx.steps[sid].uses):
                for alt in use.ref.alts:
                    producer = ctx.producer_of(alt) if isinstance(alt, Path) else None
                    if producer is not None and producer not in seen \
                            and constructs.derives_type(ctx.steps[producer].step):
                        stack.append((producer, False))
    return order


def _add_edge(ctx: Context, producer: str, consumer: str, use: Use) -> None:
    g = ctx.graph
    data = (g.edges[producer, consumer] if g.has_edge(producer, consumer)
            else g.add_edge(producer, consumer, vars=[], conditions=[], uses=[]))
    data.setdefault("vars", [])
    data.setdefault("uses", []).append(use)
    name = ctx.steps[producer].step.output_name
    if use.kind == "condition":
        data.setdefault("conditions", []).append(name)
    elif name not in data["vars"]:
        data["vars"].append(name)


def _resolve(ctx: Context, use: Use) -> list[str]:
    """Check each alternative of a reference; return the steps it reads from."""
    producers, types, local_read = [], [], False
    for alt in use.ref.alts:
        if isinstance(alt, Literal):
            types.append(T.of_value(alt.value))
            continue
        local = local_type(ctx, use, alt.root)
        if local is not None:  # a name the step binds itself (`for_each` item, `self`)
            types.append(_walk(ctx, local, alt, 0, use.span) or T.ANY)
            local_read = True
            continue
        t = path_type(ctx, alt, use.span)
        types.append(t or T.ANY)
        if t is None:
            continue
        producer = ctx.producer_of(alt)
        if producer is not None:
            producers.append(producer)
    if local_read:  # typed per step: `${item}` is another value in another map
        ctx.steps[use.consumer].local_ref_types[use.ref] = T.join(types)  # type: ignore[index]
    else:
        ctx.ref_types[use.ref] = T.join(types)
    return producers


def path_type(ctx: Context, path: Path, span: Span) -> T.Type | None:
    """The static type of ``path``; None (after reporting) when it names nothing."""
    out = ctx.out
    if path.root == "input":
        if not path.segments:
            return T.OBJECT
        name = path.segments[0]
        if ctx.inputs is None:
            return _walk(ctx, T.ANY, path, 1, span)
        if not isinstance(name, str) or name not in ctx.inputs:
            hint = did_you_mean(str(name), ctx.inputs)
            declared = ", ".join(ctx.inputs) or "none"
            out.add("undefined-input", f"undefined input '{name}'"
                    + suggest(hint), span.start, span.end,
                    help=None if hint else f"declared inputs: {declared}")
            return None
        return _walk(ctx, ctx.input_type(name), path, 1, span)
    if path.root in ctx.unchecked_outputs and path.root not in ctx.producers:
        return T.ANY
    if path.root not in ctx.producers and path.root in ctx.outer:  # read around a block
        return _walk(ctx, ctx.outer[path.root], path, 0, span)
    if path.root not in ctx.producers:
        by_id = ctx.steps.get(path.root)
        if by_id is not None and by_id.step.output_name != path.root:
            out.add("undefined-reference", f"'{path.root}' is a step id, not an output name",
                    span.start, span.end,
                    help=f"step '{path.root}' binds its result to "
                         f"'{by_id.step.output_name}': write ${{{by_id.step.output_name}}}")
            return None
        inner = constructs.block.inner_hint(ctx, path.root)
        if inner is not None:
            out.add("undefined-reference", f"undefined reference '{path.root}'{inner[0]}",
                    span.start, span.end, help=inner[1])
            return None
        hint = did_you_mean(path.root, [*ctx.producers, *ctx.unchecked_outputs, *ctx.outer,
                                        "input"])
        out.add("undefined-reference", f"undefined reference '{path.root}': no step produces it"
                + suggest(hint), span.start, span.end)
        return None
    return _walk(ctx, ctx.output_types.get(path.root, T.ANY), path, 0, span)


def _walk(ctx: Context, t: T.Type, path: Path, start: int, span: Span) -> T.Type | None:
    shown = ".".join([path.root, *(str(s) for s in path.segments[:start])])
    for seg in path.segments[start:]:
        if t.kind == "any":
            return T.ANY
        if isinstance(seg, int):
            if t.kind != "array":
                ctx.out.add("unknown-field-path", f"'{shown}' is {_a(t)}, not an array: "
                            f"it cannot be indexed with [{seg}]", span.start, span.end)
                return None
            t = t.items or T.ANY
            shown += f"[{seg}]"
            continue
        if t.kind != "object":
            ctx.out.add("unknown-field-path",
                        f"'{shown}' is {_a(t)}: it has no field '{seg}'", span.start, span.end)
            return None
        if t.fields is not None:
            ft = t.field(seg)
            if ft is None:
                hint = did_you_mean(seg, t.field_names)
                ctx.out.add("unknown-field-path",
                            f"'{shown}' has no field '{seg}'"
                            + suggest(hint),
                            span.start, span.end,
                            help=f"its fields are: {', '.join(t.field_names) or 'none'}")
                return None
            t = ft
        else:
            t = T.ANY
        shown += f".{seg}"
    return t


def _a(t: T.Type) -> str:
    name = str(t)
    return ("an " if name[0] in "aeiou" else "a ") + name


def output_type(ctx: Context, info: StepInfo) -> T.Type:
    """The static type of a step's result."""
    step = info.step
    if isinstance(step, ApprovalStep):  # typed from what it puts up for approval
        known = ctx.output_types.get(step.output_name)
        if known is None:
            ctx.output_types[step.output_name] = T.ANY  # a cycle is reported elsewhere
            known = approval.output_type(ctx, step, lambda i: output_type(ctx, i))
            ctx.output_types[step.output_name] = known
        return known
    if isinstance(step, LLMStep):
        rf = step.response_format
        if rf is None or rf.type == "text":
            return T.STRING
        if rf.type == "json_object":
            return T.OBJECT
        return T.from_json_schema(rf.schema_)
    if not isinstance(step, MCPToolStep):
        return T.ANY  # typed once what it reads is (`constructs.output_type`)
    if ctx.catalog is not None:
        tools = ctx.catalog.tools_of(step.server)
        if tools is not None and step.tool in tools:
            return T.of_tool_output(tools[step.tool].output_schema)
    return T.ANY


scan_step_template = _scan_template  # for the fields of flowc.constructs' steps

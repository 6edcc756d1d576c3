"""What the language server knows of a pipeline, in offsets into the editor's text.

Findings are `flowc check`'s own (``compile_source``, the same rules, messages and spans).
Hover, go-to-definition and completion read the compiler's own tables (steps, inputs, each
output's type, each reference's span), built by its front end; nothing here re-derives a
type.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flowc import types as T
from flowc.checks.references import collect_uses, path_type, resolve_uses
from flowc.checks.structure import check_structure
from flowc.compiler import Project, _gc_paused, compile_source
from flowc.config import BUILTIN_PROVIDERS, TOOL_CACHE, ProjectConfig, find_config
from flowc.context import Context, StepInfo, Use
from flowc.diagnostics import Collector, Diagnostic
from flowc.expr import ExprSyntaxError, Literal, parse_reference
from flowc.expr import Path as RefPath
from flowc.lsp.positions import BOM, CompilerLines
from flowc.model import ApprovalStep, LLMStep, MCPToolStep, PipelineStep
from flowc.source import SourceFile, Span, YamlError, load_yaml


# -- findings ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Finding:
    start: int  # offsets into the editor's text
    end: int
    diagnostic: Diagnostic


def findings(text: str, path: str, project: Project) -> list[Finding]:
    """What `flowc check` reports for ``text``, placed in the editor's text."""
    return placed(compile_source(text, path, project).diagnostics, text)


def placed(diags: list[Diagnostic], text: str) -> list[Finding]:
    """The compiler's findings on ``text`` (a pipeline, or flowc.yaml) placed in it."""
    lines = CompilerLines(text)
    return [Finding(lines.offset(d.line, d.col), lines.offset(d.end_line, d.end_col), d)
            for d in diags]


class Projects:
    """Each flowc.yaml loaded once, and again when it or its tool cache changes on disk, as
    `flowc check` finds it: the nearest one in the pipeline's folder or a parent."""

    def __init__(self) -> None:
        self._loaded: dict[Path, tuple[tuple[int, ...], Project]] = {}

    def for_file(self, path: Path | None) -> tuple[Project, bool]:
        """The pipeline's project, and whether it was (re)loaded by this call."""
        config = find_config(path) if path is not None else None
        if config is None:
            return Project(), False
        stamp = (*_stamp(config), *_stamp(config.parent / TOOL_CACHE))
        known = self._loaded.get(config)
        if known is not None and known[0] == stamp:
            return known[1], False
        project = Project.load(config)
        self._loaded[config] = (stamp, project)
        return project, True


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (0, -1)
    return (st.st_mtime_ns, st.st_size)


# -- symbols -----------------------------------------------------------------------------------
@dataclass
class Symbols:
    """The compiler's tables for one version of a document."""

    ctx: Context
    shift: int  # 1 when the editor's text starts with a byte order mark

    @property
    def uses(self) -> Iterator[Use]:
        for info in self.ctx.steps.values():
            yield from info.uses
        yield from self.ctx.output_uses

    def type_of(self, path: RefPath) -> T.Type | None:
        """The checker's type of ``path``; None when it names nothing."""
        quiet = dataclasses.replace(self.ctx, out=Collector(self.ctx.source))
        return path_type(quiet, path, Span(0, 0))

    def line_of(self, offset: int) -> int:
        return self.ctx.source.position(offset).line


def symbols(text: str, path: str, project: Project) -> Symbols | None:
    """The compiler's front end (YAML, structure, references) run for its tables; None when
    the text is not a YAML mapping."""
    source = SourceFile(path, text.removeprefix(BOM))
    with _gc_paused():  # as the compiler does: its many small objects made the collector slow
        try:
            raw = load_yaml(source)
        except YamlError:
            return None
        if not isinstance(raw, dict):
            return None
        ctx = Context(source, Collector(source), raw, project.config, project.catalog)
        check_structure(ctx)
        collect_uses(ctx)
        resolve_uses(ctx)
    return Symbols(ctx, 1 if text.startswith(BOM) else 0)


# -- hover and definition ----------------------------------------------------------------------
def _use_at(sym: Symbols, at: int) -> Use | None:
    best: Use | None = None
    for use in sym.uses:
        s = use.span
        if s.start <= at < s.end and (best is None or s.end - s.start < best.span.end -
                                       best.span.start):
            best = use
    return best


def _alt_spans(sym: Symbols, use: Use) -> list[tuple[RefPath | Literal, int, int]]:
    """Each alternative of the reference with its span in the file; where the file's text
    does not show them one by one (an escaped scalar, a Jinja name), the whole reference's."""
    text = sym.ctx.source.text
    alts = use.ref.alts
    base = use.span.start - use.ref.span[0] if use.kind == "condition" else use.span.start + 2
    out: list[tuple[RefPath | Literal, int, int]] = []
    for alt in alts:
        s, e = base + alt.span[0], base + alt.span[1]
        if alt.span == (0, 0) or e > use.span.end or (
                isinstance(alt, RefPath) and not text.startswith(alt.root, s)):
            return [(a, use.span.start, use.span.end) for a in alts]
        out.append((alt, s, e))
    return out


def hover(sym: Symbols, offset: int) -> tuple[str, int, int] | None:
    """Markdown for the reference at ``offset``: its type as the checker prints it and
    where its value comes from; with the editor's span it covers."""
    use = _use_at(sym, offset - sym.shift)
    if use is None:
        return _hover_model(sym, offset)
    spans = _alt_spans(sym, use)
    here = [x for x in spans if x[1] <= offset - sym.shift < x[2]] or spans
    parts = [_describe(sym, alt) for alt, _, _ in (here[:1] if len(here) < len(spans)
                                                    else here)]
    if len(use.ref.alts) > 1:
        whole = sym.ctx.ref_types.get(use.ref)
        if whole is not None:
            parts.append(f"The whole reference (first alternative with a value): "
                         f"`{_type_text(whole)}`")
    start, end = (here[0][1], here[0][2]) if len(here) < len(spans) else (
        use.span.start, use.span.end)
    return "\n\n".join(parts), start + sym.shift, end + sym.shift


def _describe(sym: Symbols, alt: RefPath | Literal) -> str:
    if isinstance(alt, Literal):
        return f"```\n{alt.value!r}: {T.of_value(alt.value)}\n```\na literal fallback"
    t = sym.type_of(alt)
    head = f"```\n{alt}: {_type_text(t) if t is not None else 'undefined'}\n```"
    lines = [head]
    ctx = sym.ctx
    if alt.root == "input":
        name = alt.segments[0] if alt.segments else None
        spec = ctx.inputs.get(name) if ctx.inputs and isinstance(name, str) else None
        if spec is not None:
            key = ctx.source.keys.get(("inputs", name))
            where = f", declared on line {sym.line_of(key.start)}" if key else ""
            lines.append(f"Pipeline input `{name}` ({spec.type}){where}.")
            if spec.description:
                lines.append(spec.description)
            if "default" in spec.model_fields_set:
                lines.append(f"Default: `{spec.default!r}`")
        elif not alt.segments:
            lines.append("The pipeline's inputs.")
        return "\n\n".join(lines)
    info = _producer(sym, alt.root)
    if info is None:
        return head
    step = info.step
    what = f"model `{step.model}`" if isinstance(step, LLMStep) else \
        f"pipeline `{step.pipeline}`" if isinstance(step, PipelineStep) else \
        f"tool `{step.server}.{step.tool}`" if isinstance(step, MCPToolStep) else \
        "approved by a person" if isinstance(step, ApprovalStep) else \
        f"typed {ctx.output_types.get(step.output_name, T.ANY)}"
    lines.append(f"The result of step `{step.id}` ({step.type}, {what}), line "
                 f"{sym.line_of(_step_span(sym, info.index).start)}.")
    if step.when is not None and step.when is not True:
        lines.append(f"Runs only when: `{step.when}`")
    missing = T.optional_field(ctx.output_types.get(alt.root, T.ANY), alt.segments)
    if missing is not None:
        lines.append(f"May be missing: the schema does not require `{missing}`.")
    return "\n\n".join(lines)


def _type_text(t: T.Type) -> str:
    """The checker's type printer, with what a schema adds: an enum's values, the fields."""
    text = str(t)
    if t.values:
        text += " (one of " + ", ".join(repr(v) for v in t.values[:20]) + ")"
    elif t.kind == "object" and t.fields:
        shown = [f"{k}{'?' if k in t.optional else ''}: {v}" for k, v in t.fields[:20]]
        text += " {" + ", ".join(shown) + (", ..." if len(t.fields) > 20 else "") + "}"
    return text


def _producer(sym: Symbols, name: str) -> StepInfo | None:
    sid = sym.ctx.producers.get(name)
    return sym.ctx.steps.get(sid) if sid is not None else None


def _step_span(sym: Symbols, index: int) -> Span:
    return sym.ctx.source.span_of(("steps", index, "id"))


def _hover_model(sym: Symbols, offset: int) -> tuple[str, int, int] | None:
    """A step's `model:` value: what the alias resolves to."""
    config = sym.ctx.config
    if config is None:
        return None
    at = offset - sym.shift
    for info in sym.ctx.steps.values():
        step = info.step
        span = sym.ctx.source.values.get(("steps", info.index, "model"))
        if isinstance(step, LLMStep) and span and span.start <= at < span.end:
            target = config.resolve_model(step.model)
            text = (f"`{step.model}`: provider `{target[0]}`, model `{target[1]}`" if target
                    else f"`{step.model}`: not a model flowc.yaml or its providers know")
            return text, span.start + sym.shift, span.end + sym.shift
    return None


def definition(sym: Symbols, offset: int) -> tuple[int, int] | None:
    """Where the name at ``offset`` is defined: a step's `id:` for a reference to its
    result or for a `needs:` entry, the declaration under `inputs:` for `${input.x}`."""
    at = offset - sym.shift
    ctx = sym.ctx
    use = _use_at(sym, at)
    span: Span | None = None
    if use is not None:
        spans = _alt_spans(sym, use)
        alt = next((a for a, s, e in spans if s <= at < e), spans[0][0])
        if isinstance(alt, RefPath):
            span = _defined(sym, alt)
    else:
        for info in ctx.steps.values():
            for i, need in enumerate(info.step.needs):
                s = ctx.source.values.get(("steps", info.index, "needs", i))
                if s and s.start <= at < s.end and need in ctx.steps:
                    span = _step_span(sym, ctx.steps[need].index)
    if span is None:
        return None
    return span.start + sym.shift, span.end + sym.shift


def _defined(sym: Symbols, alt: RefPath) -> Span | None:
    ctx = sym.ctx
    if alt.root == "input":
        name = alt.segments[0] if alt.segments else None
        return ctx.source.keys.get(("inputs", name)) if isinstance(name, str) else None
    info = _producer(sym, alt.root)
    if info is not None:
        return _step_span(sym, info.index)
    steps = ctx.raw.get("steps")
    for i, item in enumerate(steps if isinstance(steps, list) else ()):
        # A step the checker refused still defines its name: go there, where the error is.
        if isinstance(item, dict) and alt.root in (item.get("output"), item.get("id")):
            return ctx.source.span_of(("steps", i, "id"))
    return None


# -- completion --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    label: str
    kind: str  # output | input | field | model | provider | step
    detail: str
    start: int  # the editor's text that choosing the item replaces
    end: int
    documentation: str | None = None


_PATH_SO_FAR = re.compile(r"(?:([A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*|\[\d+\]|\[\"[^\"]*\"\])*)"
                          r"\.)?([\w-]*)")
_LONGEST_LINE = 4000  # a longer line is not one being typed; its regexes would cost O(n^2)
_MODEL_SO_FAR = re.compile(r"^\s*(?:-\s+)?model:\s*[\"']?([\w./:@-]*)$")
_NEEDS_SO_FAR = re.compile(r"^\s*(?:-\s+)?needs:\s*\[?\s*(?:[\w-]+\s*,\s*)*([\w-]*)$")
_NEEDS_ITEM = re.compile(r"^(\s*)-\s+([\w-]*)$")


def completions(sym: Symbols | None, text: str, offset: int) -> list[Item]:
    """What may be typed at ``offset``: inside `${`, output names, `input`, input names
    after `input.` and an output's fields after `name.`; after `model:`, the models the
    project knows; in `needs:`, step ids. ``sym`` may be from an earlier version of the
    text (the current one being mid-edit); only its names are used then."""
    if sym is None:
        return []
    line_start = max(text.rfind("\n", 0, offset), text.rfind("\r", 0, offset)) + 1
    before = text[line_start:offset]
    if len(before) > _LONGEST_LINE:
        return []
    ref = before.rfind("${")
    if ref >= 0 and "}" not in before[ref:] and not before[:ref].endswith("$"):
        return _reference_items(sym, before[ref + 2 :].split("??")[-1].lstrip(), offset)
    m = _MODEL_SO_FAR.match(before)
    if m:
        return _model_items(sym.ctx.config, offset - len(m.group(1)), offset)
    m = _NEEDS_SO_FAR.match(before) or (_NEEDS_ITEM.match(before)
                                        if _under_needs(text, line_start) else None)
    if m:
        word = m.group(m.lastindex or 0)
        return [Item(sid, "step", f"step ({info.step.type})", offset - len(word), offset)
                for sid, info in sym.ctx.steps.items()]
    return []


def _under_needs(text: str, line_start: int) -> bool:
    """Whether the line is an item of a block list under `needs:`."""
    prev_end = line_start - 1
    while prev_end > 0:
        start = text.rfind("\n", 0, prev_end) + 1
        line = text[start:prev_end].rstrip("\r")
        stripped = line.strip()
        if stripped.startswith("- ") or not stripped:
            prev_end = start - 1
            continue
        return stripped.endswith("needs:")
    return False


def _reference_items(sym: Symbols, so_far: str, offset: int) -> list[Item]:
    m = _PATH_SO_FAR.fullmatch(so_far)
    if m is None:
        return []
    base, word = m.group(1), m.group(2)
    start = offset - len(word)
    ctx = sym.ctx
    if base is None:
        items = [Item("input", "input", "the pipeline's inputs", start, offset)]
        for name, sid in ctx.producers.items():
            info = ctx.steps[sid]
            t = ctx.output_types.get(name, T.ANY)
            items.append(Item(name, "output", _type_text(t), start, offset,
                              f"The result of step `{sid}` ({info.step.type}), line "
                              f"{sym.line_of(_step_span(sym, info.index).start)}."))
        return items
    if base == "input":
        return [Item(name, "input", spec.type, start, offset, spec.description)
                for name, spec in (ctx.inputs or {}).items()]
    try:
        ref = parse_reference(base)
    except ExprSyntaxError:
        return []
    path = ref.alts[0]
    t = sym.type_of(path) if isinstance(path, RefPath) else None
    if t is None or t.kind != "object" or not t.fields:
        return []
    return [Item(k, "field", _type_text(v) + (" (may be missing)" if k in t.optional else ""),
                 start, offset) for k, v in t.fields]


def _model_items(config: ProjectConfig | None, start: int, end: int) -> list[Item]:
    """Aliases from flowc.yaml, every provider/model it names that resolves, and each
    provider as a `provider/` prefix: the names `unknown-model` accepts."""
    items: list[Item] = []
    providers = list(BUILTIN_PROVIDERS)
    if config is not None:
        providers = config.provider_names
        for alias, target in sorted(config.models.items()):
            items.append(Item(alias, "model", f"alias of {target}", start, end))
        named = {*config.models.values(), *config.fallbacks,
                 *(m for ms in config.fallbacks.values() for m in ms), *config.prices,
                 *config.quality}
        for name in sorted(named - set(config.models)):
            if "/" in name and config.resolve_model(name) is not None:
                items.append(Item(name, "model", "named in flowc.yaml", start, end))
    items += [Item(f"{p}/", "provider", "provider", start, end) for p in providers]
    return items


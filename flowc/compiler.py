"""Compile a pipeline file: parse, check everything, build the DAG."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from flowc.approval import check_approvals
from flowc.checks.budget import check_budget
from flowc.checks.caching import check_caching
from flowc.checks.conditions import check_conditions
from flowc.checks.flow import check_cycles, check_skips, check_usage
from flowc.checks.project import check_project
from flowc.checks.references import collect_uses, resolve_uses
from flowc.checks.structure import check_structure
from flowc.config import TOOL_CACHE, ProjectConfig, ToolCatalog, find_config
from flowc.constructs import check as check_constructs
from flowc.context import Context
from flowc.diagnostics import Collector, Diagnostic, Severity
from flowc.expr import Path as RefPath
from flowc.ir import CompiledPipeline, StepNode
from flowc.model import Pipeline
from flowc.source import SourceFile, YamlError, load_yaml
from flowc.subpipeline import output_type_of
from flowc.template import parse_template
from flowc.validate import field_names, report_validation_error

# A `type: pipeline` step's callee by name: its YAML text and the label its findings name
# (a file path, or `<registered x>`), or None. The server fills it with what it serves.
PipelineSource = Callable[[str], "tuple[str, str] | None"]


@dataclass
class Project:
    """The project a pipeline belongs to: its config (if any), known tool schemas, and the
    pipelines a `type: pipeline` step may name (``pipelines``: besides files beside it)."""

    config: ProjectConfig | None = None
    catalog: ToolCatalog | None = None
    config_path: str | None = None
    diagnostics: list[Diagnostic] = field(default_factory=list)
    pipelines: PipelineSource | None = None
    # Where a pipeline with no file of its own (registered over the API) is taken to live:
    # its `pipeline: ./x.yaml` and sibling names are looked up there, not in the cwd.
    pipelines_dir: Path | None = None

    @classmethod
    def load(cls, config_path: Path | None) -> Project:
        """Load ``flowc.yaml``; problems in it become diagnostics on that file."""
        if config_path is None:
            return cls()
        source = SourceFile.read(config_path)
        out = Collector(source)
        try:
            raw = load_yaml(source)
        except YamlError as exc:
            out.add(exc.rule, exc.message, exc.offset, exc.end, exc.help)
            return cls(config_path=str(config_path), diagnostics=out.results())
        for key, offset in source.duplicate_keys:
            out.add("duplicate-key", f"duplicate key '{key}' in mapping", offset)
        try:
            config = ProjectConfig.model_validate(raw or {})
        except ValidationError as exc:
            report_validation_error(out, exc, (), _config_fields_at, what="config field")
            return cls(config_path=str(config_path), diagnostics=out.results())
        cache = config_path.parent / TOOL_CACHE
        return cls(config, ToolCatalog.load(config, cache), str(config_path), out.results())

    @classmethod
    def discover(cls, start: Path) -> Project:
        return cls.load(find_config(start))


def _config_fields_at(loc: tuple) -> list[str]:
    from flowc.config import MCPServerConfig, ProviderConfig, ToolSchema

    if loc[:1] == ("mcpServers",) and len(loc) == 2:
        return field_names(MCPServerConfig)
    if loc[:1] == ("mcpServers",) and len(loc) >= 4:
        return field_names(ToolSchema)
    if loc[:1] == ("providers",):
        return field_names(ProviderConfig)
    return field_names(ProjectConfig)


@dataclass
class CompileResult:
    path: str
    diagnostics: list[Diagnostic]
    compiled: CompiledPipeline | None  # None when there are errors

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity is Severity.ERROR]

    @property
    def ok(self) -> bool:
        return not self.errors


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Compiling allocates many small, acyclic objects; the cyclic collector's full passes
    grow with the heap and made a 10,000-step file ~50% slower. Pause it, then restore."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def compile_source(text: str, path: str = "<pipeline>", project: Project | None = None,
                   ignore: frozenset[str] = frozenset()) -> CompileResult:
    """Check one pipeline and, if it has no errors, build its DAG. Never raises for bad
    input: every problem is a diagnostic."""
    with _gc_paused():
        return _compile(text, path, project or Project(), ignore)


def _compile(text: str, path: str, project: Project, ignore: frozenset[str]) -> CompileResult:
    # A byte order mark is invisible in editors; left in, it shifted every column by one.
    source = SourceFile(path, text.removeprefix("\ufeff"))
    out = Collector(source)
    try:
        raw = load_yaml(source)
    except YamlError as exc:
        out.add(exc.rule, exc.message, exc.offset, exc.end, exc.help)
        return CompileResult(path, out.results(ignore), None)
    for key, offset in source.duplicate_keys:
        out.add("duplicate-key", f"duplicate key '{key}' in mapping", offset,
                offset + len(key))
    ctx = Context(source, out, raw, project.config, project.catalog)
    ctx.pipelines = project.pipelines
    ctx.pipelines_dir = project.pipelines_dir
    check_structure(ctx)
    if isinstance(raw, dict):
        collect_uses(ctx)
        check_resolved(ctx)
    has_errors = any(d.severity is Severity.ERROR for d in out.results())
    compiled = None if has_errors else _build(ctx, path)
    if compiled is not None:  # a worst case needs the whole, valid pipeline
        check_budget(ctx, compiled)
        if any(d.severity is Severity.ERROR for d in out.results(ignore)):
            compiled = None  # a budget finding may be ignored: the run still enforces it
    return CompileResult(path, out.results(ignore), compiled)


def check_resolved(ctx: Context) -> None:
    """Every check after the references are collected (a block's steps get them too)."""
    check_typed(ctx)
    check_flow(ctx)


def check_typed(ctx: Context) -> None:
    """What a block's result type needs of its steps (the enclosing file's typing)."""
    resolve_uses(ctx)
    check_constructs(ctx)
    check_cycles(ctx)
    check_conditions(ctx)


def check_flow(ctx: Context) -> None:
    """The rest: a block's steps get these once the enclosing file's skip check knows which
    values around the block may be missing (constructs/block.py `check_steps`)."""
    check_skips(ctx)
    check_usage(ctx)
    check_project(ctx)
    check_caching(ctx)
    check_approvals(ctx)


def compile_file(path: str | Path, project: Project | None = None,
                 ignore: frozenset[str] = frozenset()) -> CompileResult:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        source = SourceFile(str(path), "")
        out = Collector(source)
        out.add("invalid-document", f"cannot read file: {exc.strerror or exc}", 0)
        return CompileResult(str(path), out.results(), None)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:  # YAML is Unicode: say where, don't guess
        text = raw.decode("utf-8", errors="replace")
        source = SourceFile(str(path), text)
        out = Collector(source)
        at = len(raw[: exc.start].decode("utf-8", errors="replace"))
        out.add("yaml-syntax", f"the file is not valid UTF-8 (byte 0x{raw[exc.start]:02x})",
                at, at + 1, help="save it as UTF-8")
        return CompileResult(str(path), out.results(ignore), None)
    if project is None:
        project = Project.discover(p)
    return compile_source(text, str(path), project, ignore)


def _build(ctx: Context, path: str) -> CompiledPipeline:
    pipeline = Pipeline.model_validate({**ctx.raw, "steps": [i.step for i in ctx.steps.values()]})
    g = ctx.graph
    for sid, info in ctx.steps.items():
        reads = sorted({alt.root for use in info.uses for alt in use.ref.alts
                        if isinstance(alt, RefPath) and alt.root != "input"})
        for pred in g.predecessors(sid):
            g.edges[pred, sid].pop("uses", None)
        g.nodes[sid]["node"] = StepNode(
            step=info.step, condition=info.condition, templates=dict(info.templates),
            reads=tuple(reads), refs=tuple((u.ref, u.kind) for u in info.uses),
            output_type=ctx.output_types[info.step.output_name],
            runs=info.runs, skip_reason=info.skip_reason, params=info.params,
            construct=info.construct, case=info.case, case_test=info.case_test,
            items=info.items, until=info.until, callee=info.callee)
    raw_out = pipeline.output
    output = (None if raw_out is None else parse_template(raw_out) if isinstance(raw_out, str)
              else {k: parse_template(v) for k, v in raw_out.items()})
    return CompiledPipeline(pipeline, g, tuple(ctx.order), output, path,
                            metadata={"output_type": output_type_of(ctx)})

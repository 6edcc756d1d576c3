"""`type: pipeline` steps (sub-pipelines): the callee is found, compiled and typed here;
runtime/subpipeline.py runs it.

`pipeline:` is a file relative to the caller (`./summarize.yaml`) or a name: one the
caller's project gives (`Project.pipelines`: the server's, registered ones included) or the
`name:` of a pipeline file in the caller's folder. The step's `inputs:` are checked
against the callee's declared inputs (unknown, missing, wrong type), and its result is
typed from the callee's `output:`. Pipelines that call each other in a cycle are an error
naming the cycle.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from flowc import types as T
from flowc.context import Context, StepInfo
from flowc.expr import single_reference
from flowc.validate import did_you_mean, suggest

# The files being compiled, outermost first: a callee already on it is a cycle.
_STACK: ContextVar[tuple[str, ...]] = ContextVar("flowc_pipeline_stack", default=())
_KINDS_FIT = {("integer", "number")}  # (value, declared): an integer is a number


def scan(ctx: Context, info: StepInfo, scan_params: Any) -> None:
    from flowc.model import PipelineStep

    step = info.step
    if not isinstance(step, PipelineStep):
        return
    base = ctx.step_path(step.id)
    info.params = scan_params(ctx, info, (*base, "inputs"), step.inputs)
    span = ctx.source.span_of((*base, "pipeline"))
    path_like = "/" in step.pipeline or step.pipeline.endswith((".yaml", ".yml"))
    # A name is first what the caller's project serves under it (the server's pipelines,
    # registered ones too), then a file beside the caller with that `name:`.
    given = None if path_like or ctx.pipelines is None else ctx.pipelines(step.pipeline)
    folder, registered = _folder(ctx)
    target = None if given is not None else find(folder, step.pipeline)
    if target is None and given is None:
        where = f"in the project's pipelines folder {folder}" if registered else ""
        if path_like:
            why = "no such file" + (f" {where} (a registered pipeline is looked up as if it "
                                    "were a file there)" if registered else "")
        else:
            why = ("no such file, "
                   + ("" if ctx.pipelines is None else "none is served by that name, ")
                   + f"and no pipeline file {where or 'beside this one'} has "
                   f"`name: {step.pipeline}`")
        ctx.out.add("pipeline-not-found", f"pipeline '{step.pipeline}' not found: {why}",
                    span.start, span.end,
                    help="give a path relative to "
                         + ("the pipelines folder" if registered else "this file")
                         + " (./summarize.yaml) or a pipeline's name")
        return
    here = _key(ctx.source.path, ctx.raw.get("name"))
    key = str(target) if target is not None else _key(given[1], step.pipeline)  # type: ignore[index]
    stack = _STACK.get() or (here,)
    if key in stack:
        chain = [*stack[stack.index(key):], key]
        ctx.out.add("pipeline-cycle", "pipelines call each other in a cycle: "
                    + " -> ".join(_shown(p) for p in chain), span.start, span.end,
                    help="a pipeline cannot call itself, directly or through others")
        return
    from flowc.compiler import Project, compile_file, compile_source

    token = _STACK.set((*stack, key))
    project = Project(config=ctx.config, catalog=ctx.catalog, pipelines=ctx.pipelines,
                      pipelines_dir=ctx.pipelines_dir)
    try:
        result = compile_file(target, project) if target is not None else \
            compile_source(given[0], given[1], project)  # type: ignore[index]
    finally:
        _STACK.reset(token)
    errors = result.errors
    cycle = next((d for d in errors if d.rule == "pipeline-cycle"), None)
    if cycle is not None:
        ctx.out.add("pipeline-cycle", cycle.message, span.start, span.end, help=cycle.help)
    elif errors:
        first = errors[0]
        ctx.out.add("pipeline-errors",
                    f"pipeline '{step.pipeline}' has {len(errors)} error"
                    f"{'s' if len(errors) != 1 else ''}; the first: {Path(first.path).name}:"
                    f"{first.line}:{first.col}: {first.message}", span.start, span.end,
                    help=f"run `flowc check {step.pipeline}`")
    if result.compiled is not None:
        for callee_step in result.compiled.pipeline.steps:
            if callee_step.type == "approval":
                ctx.out.add("pipeline-approval", f"pipeline '{step.pipeline}' has an approval "
                            f"step ('{callee_step.id}'): a run waits for approvals at its top "
                            "level, not inside a sub-pipeline", span.start, span.end,
                            help="put the approval step in this pipeline, before or after the "
                                 "call")
    info.callee = result.compiled


def _key(label: str, name: Any) -> str:
    """What identifies a pipeline on the call stack: its file, or `<name>` for one with no
    file (registered over the API)."""
    path = Path(label)
    return str(path.resolve()) if path.is_file() else f"<{name}>"


def _shown(key: str) -> str:
    return key[1:-1] if key.startswith("<") else Path(key).name


def _folder(ctx: Context) -> tuple[Path, bool]:
    """The folder the caller's relative paths start from, and whether it is a registered
    pipeline's (one with no file of its own: the project's pipelines folder stands in)."""
    caller = Path(ctx.source.path)
    if ctx.pipelines_dir is not None and not caller.is_file():
        return Path(ctx.pipelines_dir).resolve(), True
    return caller.resolve().parent, False


def find(folder: Path, ref: str) -> Path | None:
    """The callee's file: a path relative to ``folder`` (the caller's), or the file there
    whose `name:` it is."""
    candidate = (folder / ref).resolve()
    if candidate.is_file():
        return candidate
    if "/" in ref or ref.endswith((".yaml", ".yml")):
        return None
    named = re.compile(rf"^name:\s*[\"']?{re.escape(ref)}[\"']?\s*(#.*)?$", re.M)
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        try:
            if named.search(path.read_text(encoding="utf-8", errors="replace")):
                return path.resolve()
        except OSError:
            continue
    return None


def result_type(info: StepInfo) -> T.Type:
    callee = info.callee
    return callee.metadata.get("output_type", T.ANY) if callee is not None else T.ANY


def output_type_of(ctx: Context) -> T.Type:
    """The type of a compiled pipeline's `output:` (what a caller's step gets)."""
    raw = ctx.raw.get("output") if isinstance(ctx.raw, dict) else None

    def one(text: str) -> T.Type:
        ref = single_reference(text)
        return ctx.ref_types.get(ref, T.ANY) if ref is not None else T.STRING

    if isinstance(raw, str):
        return one(raw)
    if isinstance(raw, dict):
        return T.Type("object", fields=tuple((str(k), one(v)) for k, v in raw.items()))
    return T.OBJECT


def check_inputs(ctx: Context, info: StepInfo) -> None:
    """The step's `inputs:` against the callee's declared inputs."""
    callee = info.callee
    if callee is None:
        return
    step = info.step
    base = ctx.step_path(step.id)
    declared = callee.inputs
    given: dict[str, Any] = step.inputs  # type: ignore[union-attr]
    for name, value in given.items():
        spec = declared.get(name)
        if spec is None:
            span = ctx.source.span_of((*base, "inputs", name), key=True)
            ctx.out.add("pipeline-inputs", f"pipeline '{callee.name}' has no input '{name}'"
                        + suggest(did_you_mean(name, declared)), span.start, span.end,
                        help=f"its inputs: {', '.join(declared) or 'none'}")
            continue
        t = _value_type(ctx, info, value)
        if spec.type == "string":
            continue  # any value, passed as the text a prompt would read
        if t.kind == "any":
            span = ctx.source.span_of((*base, "inputs", name))
            ctx.out.add("pipeline-inputs",
                        f"input '{name}' of pipeline '{callee.name}' is {_a(spec.type)}, but "
                        "this value's type is not known", span.start, span.end,
                        help="pass a value whose type is known: an input or a schema's "
                             f"{spec.type} field")
            continue
        if t.kind != spec.type and (t.kind, spec.type) not in _KINDS_FIT:
            span = ctx.source.span_of((*base, "inputs", name))
            ctx.out.add("pipeline-inputs",
                        f"input '{name}' of pipeline '{callee.name}' is {_a(spec.type)}, "
                        f"but this value is {_a(str(t))}", span.start, span.end)
    missing = [n for n, spec in declared.items() if spec.is_required and n not in given]
    if missing:
        span = ctx.source.span_of((*base, "inputs" if given else "pipeline"))
        ctx.out.add("pipeline-inputs",
                    f"pipeline '{callee.name}' needs input{'s' if len(missing) > 1 else ''} "
                    + ", ".join(f"'{n}'" for n in missing), span.start, span.end,
                    help="pass them under `inputs:`")


def _value_type(ctx: Context, info: StepInfo, value: Any) -> T.Type:
    if isinstance(value, str):
        ref = single_reference(value)
        if ref is not None:
            local = info.local_ref_types.get(ref)
            return local if local is not None else ctx.ref_types.get(ref, T.ANY)
        return T.STRING
    return T.of_value(value)


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind

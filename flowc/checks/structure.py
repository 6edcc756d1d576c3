"""Structure: the document shape, fields, types of values, duplicate ids and outputs."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from flowc.context import Context, StepInfo
from flowc.model import STEP_TYPES, InputSpec, Pipeline, ResponseFormat, Step, step_fields
from flowc.validate import field_names, report_validation_error

_STEP = TypeAdapter(Step)
_INPUT = TypeAdapter(InputSpec)


def check_structure(ctx: Context) -> None:
    raw = ctx.raw
    out = ctx.out
    if not isinstance(raw, dict):
        kind = "empty" if raw is None else f"a {type(raw).__name__}"
        out.add("invalid-document",
                f"a pipeline file must be a mapping with `name` and `steps`; this one is {kind}",
                0, 1)
        return

    raw_steps = raw.get("steps")
    steps_ok = isinstance(raw_steps, list) and bool(raw_steps)
    if steps_ok:
        for i, item in enumerate(raw_steps):
            _check_step(ctx, i, item)

    # Everything but the steps, which were checked one by one above.
    header = dict(raw)
    if steps_ok:
        header["steps"] = [s.step for s in ctx.steps.values()]
    try:
        Pipeline.model_validate(header)
    except ValidationError as exc:
        errors = [e for e in exc.errors() if not (steps_ok and e["loc"][:1] == ("steps",))]
        if errors:
            report_validation_error(
                out, ValidationError.from_exception_data(exc.title, errors), (),
                lambda loc: _pipeline_fields_at(loc), what="field")

    inputs = raw.get("inputs")
    if isinstance(inputs, dict):
        ctx.inputs = {}
        for name, spec in inputs.items():
            try:
                ctx.inputs[str(name)] = _INPUT.validate_python(spec if spec is not None else {})
            except ValidationError:
                ctx.inputs[str(name)] = InputSpec()  # reported above; keep the name known
    _check_unique(ctx, raw_steps if isinstance(raw_steps, list) else [])


def _pipeline_fields_at(loc: tuple[Any, ...]) -> list[str]:
    if len(loc) >= 2 and loc[0] == "inputs":
        return field_names(InputSpec)
    return field_names(Pipeline)


def _check_step(ctx: Context, index: int, item: Any) -> None:
    try:
        step = _STEP.validate_python(item)
    except ValidationError as exc:
        step_type = item.get("type") if isinstance(item, dict) else None

        def fields_at(loc: tuple[Any, ...]) -> list[str]:
            if loc[:1] == ("response_format",):
                return field_names(ResponseFormat)
            return step_fields(step_type if isinstance(step_type, str) else None)

        report_validation_error(ctx.out, exc, ("steps", index), fields_at,
                                what="step field", tags=STEP_TYPES)
        # A misspelt field is the commonest mistake: without it the step may still be valid,
        # and then its references are checked too (the file still fails to compile).
        extra = {e["loc"][-1] for e in exc.errors()
                 if e["type"] == "extra_forbidden" and len(e["loc"]) == 2}
        if isinstance(item, dict) and extra and len(extra) == len(exc.errors()):
            try:
                step = _STEP.validate_python({k: v for k, v in item.items() if k not in extra})
            except ValidationError:
                pass
            else:
                if step.id not in ctx.steps:
                    ctx.steps[step.id] = StepInfo(index, step)
                    ctx.partial.add(step.id)
                return
        if isinstance(item, dict):  # keep its output name known, so reads of it do not cascade
            name = item.get("output") or item.get("id")
            if isinstance(name, str):
                ctx.unchecked_outputs.add(name)
            if isinstance(item.get("id"), str):  # and its id: `needs` of it is no finding
                ctx.unchecked_ids.add(item["id"])
        return
    if step.id not in ctx.steps:
        ctx.steps[step.id] = StepInfo(index, step)


def _check_unique(ctx: Context, raw_steps: list[Any]) -> None:
    src, out = ctx.source, ctx.out
    first_id: dict[str, int] = {}
    for i, item in enumerate(raw_steps):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        sid = item["id"]
        if sid in first_id:
            span = src.span_of(("steps", i, "id"))
            line = src.position(src.span_of(("steps", first_id[sid], "id")).start).line
            out.add("duplicate-id", f"duplicate step id '{sid}' (first defined on line {line})",
                    span.start, span.end)
        else:
            first_id[sid] = i
    first_out: dict[str, str] = {}
    for sid, info in ctx.steps.items():
        name = info.step.output_name
        if name in first_out:
            key = "output" if info.step.output else "id"
            span = src.span_of(("steps", info.index, key))
            out.add("duplicate-output",
                    f"output name '{name}' is already bound by step '{first_out[name]}'",
                    span.start, span.end,
                    help="give each step's result its own name with `output:`")
            continue
        first_out[name] = sid
        ctx.producers[name] = sid
    if "input" in ctx.producers:
        sid = ctx.producers.pop("input")
        info = ctx.steps[sid]
        span = src.span_of(("steps", info.index, "output" if info.step.output else "id"))
        out.add("invalid-value", "'input' is reserved for the pipeline's inputs; "
                "bind the result to another name", span.start, span.end)

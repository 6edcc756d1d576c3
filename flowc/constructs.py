"""Where the checks call into the DSL v2 constructs (for_each, sub-pipelines, repeat), so
each check module has one line per hook."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flowc import foreach, repeat, subpipeline
from flowc import types as T
from flowc.context import Context, StepInfo
from flowc.model import PipelineStep


def scan(ctx: Context, info: StepInfo, scan_template: Any, scan_params: Any) -> None:
    """Record a step's construct-level references (before its own templates)."""
    foreach.scan(ctx, info, scan_template)
    subpipeline.scan(ctx, info, scan_params)
    repeat.scan(ctx, info)


def step_type(ctx: Context, info: StepInfo,
              own: Callable[[Context, StepInfo], T.Type]) -> T.Type:
    """A step's result type: its own (or its callee's), a list of it under `for_each`."""
    body = subpipeline.result_type(info) if isinstance(info.step, PipelineStep) \
        else own(ctx, info)
    info.locals["__output__"] = body  # `${self.output}` in `repeat: {until:}`
    if info.step.for_each is not None:
        return foreach.result_type(ctx, info, body)
    return body


def check(ctx: Context) -> None:
    """After references resolved: what needs their types."""
    for info in ctx.steps.values():
        if isinstance(info.step, PipelineStep):
            subpipeline.check_inputs(ctx, info)
        repeat.check(ctx, info)

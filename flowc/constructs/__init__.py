"""Step types beyond `llm` and `mcp_tool`, one module each: how the compiler reads their
fields, what they read, and the type of their result; and where the checks call into the
constructs that apply to any step (for_each, sub-pipelines, repeat), one line per hook."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flowc import foreach, repeat, subpipeline
from flowc import types as T
from flowc.constructs import block, switch, transform
from flowc.context import Context, StepInfo, Use
from flowc.expr import Node
from flowc.model import LLMStep, MCPToolStep, PipelineStep

_TYPED_FROM_READS = {"transform": transform, "switch": switch, "block": block}


def derives_type(step: object) -> bool:
    """Whether the step's result type comes from the values it reads."""
    return getattr(step, "type", None) in _TYPED_FROM_READS


def collect(ctx: Context, info: StepInfo) -> None:
    """Parse the step's own fields and record every reference in them."""
    module = _TYPED_FROM_READS.get(info.step.type)
    if module is not None and not isinstance(info.step, LLMStep | MCPToolStep):
        module.collect(ctx, info)


def output_type(ctx: Context, info: StepInfo) -> T.Type | None:
    """The step's result type once its reads are typed; None for llm and mcp_tool steps."""
    module = _TYPED_FROM_READS.get(info.step.type)
    return None if module is None else module.output_type(ctx, info)


def missing_reason(ctx: Context, info: StepInfo) -> str | None:
    """Why the step's result may be missing even when it ran, or None."""
    module = _TYPED_FROM_READS.get(info.step.type)
    return None if module is None else module.missing_reason(ctx, info)



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


def check_inner(ctx: Context, info: StepInfo, status: dict[str, str],
                reason: dict[str, str], guard: dict[str, Node]) -> None:
    """A block's steps' missing values (and the checks after), once the skip check knows
    which values around it may be missing (``status``, ``reason``, ``guard``: its own)."""
    if info.step.type == "block":
        block.check_steps(ctx, info, status, reason, guard)


def read_around(ctx: Context, use: Use) -> bool:
    """Whether a reference inside a block reads only values from around it: the enclosing
    file's check covers it."""
    return block.read_around(ctx, use)


def same_case(ctx: Context, consumer: str | None, output_name: str) -> bool:
    """Whether a maybe-skipped read is always there for this reader: both run in the same
    switch case."""
    return switch.same_case(ctx, consumer, output_name)

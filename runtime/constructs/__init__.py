"""Running the step types of flowc.constructs, one module each."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runtime import block
from runtime.constructs import switch, transform

if TYPE_CHECKING:
    from flowc.ir import StepNode
    from runtime.executor import StepResult, _Run

_RUNNERS = {"transform": transform.run, "switch": switch.run, "block": block.run}


async def run_construct(run: _Run, node: StepNode, r: StepResult) -> Any:
    """The step's result (no model call; it costs $0)."""
    return await _RUNNERS[node.step.type](run, node, r)

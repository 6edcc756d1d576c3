"""Running a `type: block` step (flowc/constructs/block.py): its steps run as a nested run,
as a sub-pipeline's do (runtime/subpipeline.py), with the pipeline's inputs and the values
the block reads from around it. Each step's calls carry `block/step` as the ledger's
`step_id` (`per_doc[3]/summary` in a map), its steps go on the block's record (`steps`), and
their costs roll up into the block's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runtime.subpipeline import run_nested

if TYPE_CHECKING:
    from flowc.ir import StepNode
    from runtime.executor import StepResult, _Run


async def run(run: _Run, node: StepNode, r: StepResult) -> Any:
    seen = {name: run.scope(name) for name in node.construct}
    return await run_nested(run, node, r, run.inputs, f"block '{node.step.id}'", seen)

"""Running `type: switch`: the case steps gated themselves (each checks its case when its
reads are ready); the switch's result is the result of the case that ran."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from flowc.constructs.switch import SwitchPlan
from flowc.expr import MISSING, EvalError, Missing, Path, evaluate, resolve_path

if TYPE_CHECKING:
    from flowc.ir import StepNode
    from runtime.executor import StepResult, _Run


async def run(run: _Run, node: StepNode, r: StepResult) -> Any:
    from runtime.executor import StepSkipped

    plan = node.construct
    assert isinstance(plan, SwitchPlan)
    for name in plan.results:
        value = resolve_path(Path(name), run.scope)
        if value is not MISSING:
            return value
    try:
        shown = json.dumps(evaluate(plan.on, run.scope), default=str)
    except (EvalError, Missing):
        shown = "its value"
    taken = [n for n, label in plan.results.items() if label is not None and
             json.dumps(label) == shown]
    if not taken and not any(label is None for label in plan.results.values()):
        raise StepSkipped(f"no case matches {shown} and there is no default")
    why = "; ".join(run.missing_why.get(n, f"'{n}' has no value") for n in plan.results)
    raise StepSkipped(f"the case for {shown} produced no result ({why})")

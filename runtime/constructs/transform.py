"""Running `type: transform`: its expression evaluated by walking the compiler's parse (never
Python's `eval`), or its template rendered in the sandbox."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flowc.expr import EvalError, Missing, evaluate
from flowc.model import TransformStep

if TYPE_CHECKING:
    from flowc.ir import StepNode
    from runtime.executor import StepResult, _Run


async def run(run: _Run, node: StepNode, r: StepResult) -> Any:
    from runtime.executor import StepFailed

    step = node.step
    assert isinstance(step, TransformStep)
    if step.template is not None:
        return await run._value_of(node.templates["template"],
                                   f"template of step '{step.id}'")
    try:
        if isinstance(node.construct, dict):
            return {k: evaluate(n, run.scope) for k, n in node.construct.items()}
        return evaluate(node.construct, run.scope)
    except (EvalError, Missing) as exc:
        what = f"'{exc}' is missing" if isinstance(exc, Missing) else str(exc)
        raise StepFailed(f"expression of step '{step.id}' could not be evaluated: {what}"
                         ) from None

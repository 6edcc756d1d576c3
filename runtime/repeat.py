"""Running a step under `repeat: {until:, max:}` (flowc/repeat.py): ask again, telling the
step what its last answer was (`${self.previous}`) and what was wrong with it
(`${self.error}`), until the answer matches the step's schema and `until:` holds, at most
`max` times; then the step fails with the last problem (its `on_error:` decides the rest).
A dry run goes through every attempt and keeps the last answer.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from flowc.expr import EvalError, evaluate
from runtime import frame

if TYPE_CHECKING:
    from flowc.ir import StepNode
    from runtime.executor import StepResult, _Run


async def run_repeat(run: _Run, node: StepNode, r: StepResult) -> Any:
    from runtime.executor import StepFailed, is_schema_violation

    step = node.step
    assert step.repeat is not None
    outer = frame.NAMES.get() or {}
    me: dict[str, Any] = {}
    problem = ""
    tries = 0
    try:
        for attempt in range(1, step.repeat.max + 1):
            me = {**me, "attempt": attempt}
            frame.NAMES.set({**outer, "self": me})
            try:
                value = await run._attempts(node, r)
            except StepFailed as exc:
                if not is_schema_violation(exc):
                    raise
                tries += r.attempts
                problem = exc.problem  # type: ignore[attr-defined]
                me = {"previous": exc.answer, "error": problem}  # type: ignore[attr-defined]
                continue
            tries += r.attempts
            if node.until is None or _holds(run, node, value, me):
                return value
            if run.ex.dry_run and attempt == step.repeat.max:
                return value  # stand-in answers cannot meet `until`: a dry run checks wiring
            problem = f"`until: {step.repeat.until}` was false"
            me = {"previous": value if isinstance(value, str) else json.dumps(value),
                  "error": problem}
        r.error = (f"no acceptable answer in {step.repeat.max} attempt"
                   f"{'s' if step.repeat.max != 1 else ''}; the last: {problem}")
        raise StepFailed(r.error)
    finally:
        r.attempts = tries
        frame.NAMES.set(outer or None)


def _holds(run: _Run, node: StepNode, value: Any, me: dict[str, Any]) -> bool:
    from runtime.executor import StepFailed

    frame.NAMES.set({**(frame.NAMES.get() or {}), "self": {**me, "output": value}})
    try:
        return bool(evaluate(node.until, run.scope))  # type: ignore[arg-type]
    except EvalError as exc:
        raise StepFailed(f"`until: {node.step.repeat.until}` could not be "  # type: ignore[union-attr]
                         f"evaluated: {exc}") from None

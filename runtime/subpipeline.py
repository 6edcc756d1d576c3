"""Running a `type: pipeline` step (flowc/subpipeline.py): the callee runs as a nested run
inside this one: same run id, held to its own `max_cost_usd` and the caller's, and its
calls' ledger `step_id` is `caller/callee_step` (`map[2]/summarize` inside a map). Its steps
go on the step's record (`steps`), and their costs, tokens and calls roll up into the
step's. A value passed to a
string input that is not a string is passed as its JSON text, as a prompt would read it."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from flowc.expr import MISSING
from runtime import frame
from runtime.executor import BudgetExceeded, RunResult, StepFailed, _Run
from runtime.inputs import InputError, check_inputs

if TYPE_CHECKING:
    from flowc.ir import CompiledPipeline, StepNode
    from runtime.executor import StepResult
    from runtime.gateway.calls import CallContext


class _Nested(_Run):
    """A callee's run. Its calls are held against its own `max_cost_usd` (as a run of it
    alone would be) and its callers': ``spent`` and ``reserved`` are its own, and every
    change to them is its caller's too, so concurrent steps on either side cannot overspend
    together."""

    _parent: _Run | None = None
    output_what = "its output"

    def __init__(self, parent: _Run, compiled: CompiledPipeline, inputs: dict[str, Any],
                 prefix: str, base: CallContext) -> None:
        super().__init__(parent.ex, compiled, inputs, parent.run_id, None)
        self._parent = parent
        self.ctx = lambda sid: replace(base, step_id=f"{prefix}/{frame.label(sid)}",
                                       retries=compiled.node(sid).step.retries == 0)

    def result(self, status: str, output: Any, error: dict[str, Any] | None) -> RunResult:
        """Without the inputs' hash: the caller's run has it, and hashing the inputs again
        for each item of a map made a map's cost grow with the square of its length."""
        return RunResult(self.run_id, self.c.name, status, output, self.results,
                         (time.perf_counter() - self.t0) * 1000, "", self.ex.dry_run, error)

    def capped(self) -> list[_Run]:
        return [*super().capped(), *(self._parent.capped() if self._parent else ())]

    @property  # type: ignore[override]
    def spent(self) -> Decimal:
        return self.__dict__.get("_spent", Decimal(0))

    @spent.setter
    def spent(self, value: Decimal) -> None:
        if self._parent:
            self._parent.spent += value - self.spent
        self.__dict__["_spent"] = value

    @property  # type: ignore[override]
    def reserved(self) -> Decimal:
        return self.__dict__.get("_reserved", Decimal(0))

    @reserved.setter
    def reserved(self, value: Decimal) -> None:
        if self._parent:
            self._parent.reserved += value - self.reserved
        self.__dict__["_reserved"] = value


async def run_pipeline(run: _Run, node: StepNode, r: StepResult) -> Any:
    step = node.step
    callee = node.callee
    assert callee is not None
    args = await run._params(node.params, f"inputs of step '{step.id}'")
    for name, value in args.items():  # a string input takes any value as a prompt would
        spec = callee.inputs.get(name)
        if spec is not None and spec.type == "string" and not isinstance(value, str):
            args[name] = json.dumps(value, ensure_ascii=False, default=str)
    try:
        values = check_inputs(callee.pipeline.inputs, args)
    except InputError as exc:
        raise StepFailed(f"pipeline '{callee.name}': {exc}") from None
    return await run_nested(run, node, r, values, f"pipeline '{callee.name}'")


async def run_nested(run: _Run, node: StepNode, r: StepResult, inputs: dict[str, Any],
                     what: str, seen: dict[str, Any] | None = None) -> Any:
    """Run the step's callee (``node.callee``) as a nested run and return its output. A
    sub-pipeline sees only its ``inputs``; a block (``seen``: the values it reads from
    around it, by name) also keeps the item and `self` it runs with."""
    step, callee = node.step, node.callee
    assert callee is not None
    base = run.ctx(step.id)  # its step_id is the whole path: `outer[0]/inner`
    child = _Nested(run, callee, inputs, base.step_id, base)
    for name, value in (seen or {}).items():
        if value is MISSING:
            child.missing_why[name] = run.missing_why.get(name, f"'{name}' has no value")
        else:
            child.values[name] = value
    names = frame.NAMES.set(frame.NAMES.get() if seen is not None else None)
    label = frame.LABEL.set(None)  # the callee's steps are labelled under the step's
    try:
        result = await child.execute()
    finally:  # also when cut off (a timeout): what its steps did stays on the record
        frame.NAMES.reset(names)
        frame.LABEL.reset(label)
        _roll_up(r, child.results)
    if result.status != "succeeded":
        error = result.error or {}
        message = f"{what} failed: {error.get('message')}"
        # A caller's cap stops the caller's run; the callee's own fails this step only.
        if error.get("type") == "BudgetExceeded" and not child.over_budget:
            raise BudgetExceeded(message)
        raise StepFailed(message)
    return result.output


def _roll_up(r: StepResult, steps: dict[str, StepResult]) -> None:
    """The nested steps go on the step's record; their calls, tokens and costs into its."""
    r.steps = steps
    for s in steps.values():
        r.calls.extend({**c, "step": s.id} for c in s.calls)
        r.tokens += s.tokens
        r.model_calls += s.model_calls
        r.tool_calls += s.tool_calls
        r.cost = None if r.cost is None or s.cost is None else r.cost + s.cost

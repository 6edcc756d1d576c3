"""Running a `type: pipeline` step (flowc/subpipeline.py): the callee runs as a nested run
inside this one: same run id, held to its own `max_cost_usd` and the caller's, and its
calls' ledger `step_id` is `caller/callee_step` (`map[2]/summarize` inside a map). Its steps
go on the step's record (`steps`), and their costs, tokens and calls roll up into the
step's. A value passed to a
string input that is not a string is passed as its JSON text, as a prompt would read it."""

from __future__ import annotations

import json
from dataclasses import replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from runtime import frame
from runtime.executor import BudgetExceeded, StepFailed, _Run
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

    def __init__(self, parent: _Run, compiled: CompiledPipeline, inputs: dict[str, Any],
                 prefix: str, base: CallContext) -> None:
        super().__init__(parent.ex, compiled, inputs, parent.run_id, None)
        self._parent = parent
        self.ctx = lambda sid: replace(base, step_id=f"{prefix}/{frame.label(sid)}",
                                       retries=compiled.node(sid).step.retries == 0)

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
    child = _Nested(run, callee, values, frame.label(step.id), run.ctx(step.id))
    names, label = frame.NAMES.set(None), frame.LABEL.set(None)  # the callee's own scope
    try:
        result = await child.execute()
    finally:
        frame.NAMES.reset(names)
        frame.LABEL.reset(label)
    r.steps = child.results
    for s in child.results.values():
        r.calls.extend({**c, "step": s.id} for c in s.calls)
        r.tokens += s.tokens
        r.model_calls += s.model_calls
        r.tool_calls += s.tool_calls
        r.cost = None if r.cost is None or s.cost is None else r.cost + s.cost
    if result.status != "succeeded":
        error = result.error or {}
        message = f"pipeline '{callee.name}' failed: {error.get('message')}"
        # A caller's cap stops the caller's run; the callee's own fails this step only.
        if error.get("type") == "BudgetExceeded" and not child.over_budget:
            raise BudgetExceeded(message)
        raise StepFailed(message)
    return result.output

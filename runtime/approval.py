"""`type: approval` at run time (docs/dsl.md): the step stops its branch and the run ends in
the `waiting` state, recording what it waits for; a decision (approve, with an optional
edited value, or reject) continues the run as a resume of it (runtime/resume.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from flowc import types as T
from flowc.ir import CompiledPipeline
from flowc.model import ApprovalStep
from runtime.resume import Decision, Paused, ResumeError

if TYPE_CHECKING:
    from flowc.ir import StepNode
    from runtime.executor import StepResult, _Run


async def run_step(run: _Run, node: StepNode, r: StepResult) -> Any:
    """The step's output once decided; raises Paused until then. A dry run approves what
    is put up (or a sample of `schema:`) at once, so it shows the whole pipeline."""
    from runtime.executor import StepFailed

    step = node.step
    assert isinstance(step, ApprovalStep)
    decision = run.resume.decisions.get(step.id)
    if decision is None and run.ex.dry_run:
        decision = Decision(True, by="dry run")
    proposed = await _proposed(run, node)
    if decision is None:
        message = await run._render(node.templates["message"], run.jinja_names(),
                                    f"message template of step '{step.id}'")
        raise Paused({"message": message, "value": proposed, "schema": step.schema_,
                      "since": datetime.now(UTC).isoformat(timespec="seconds")})
    r.marks["decision"] = {"approved": decision.approved, "by": decision.by,
                           "edited": decision.edited, "reason": decision.reason}
    if not decision.approved:
        raise StepFailed(f"rejected by {decision.by or 'the approver'}"
                         + (f": {decision.reason}" if decision.reason else ""))
    if decision.edited:
        return decision.value
    if step.value is None:
        if step.schema_ is None:
            return True
        from runtime.dryrun import sample

        return sample(step.schema_)  # a dry run: a real approval of it sends a value
    return proposed


async def _proposed(run: _Run, node: StepNode) -> Any:
    step = node.step
    if getattr(step, "value", None) is None:
        return None
    return await run._value_of(node.templates["value"], f"value of step '{step.id}'")


def decide(compiled: CompiledPipeline, run_id: str, record: dict[str, Any], step_id: str, *,
           approved: bool, value: Any = None, has_value: bool = False,
           by: str | None = None, reason: str | None = None) -> Decision:
    """The decision on ``step_id`` of the waiting run ``record``, checked: the run waits for
    that step, and an edited value has the step's declared type."""
    status = record.get("status")
    if status != "waiting":
        later = record.get("continued_in")
        raise ResumeError(f"run '{run_id}' is not waiting for an approval (it is {status}"
                          + (f"; it continued as run '{later}'" if later else "") + ")")
    if compiled.name != record.get("workflow"):
        raise ResumeError(f"run '{run_id}' is a run of pipeline '{record.get('workflow')}', "
                          f"not '{compiled.name}'")
    steps = {s.get("id"): s for s in record.get("metrics", {}).get("steps", [])}
    waiting = sorted(s for s, d in steps.items() if d.get("waiting_for") is not None
                     and d.get("status") == "waiting")
    if step_id not in waiting:
        raise ResumeError(f"step '{step_id}' of run '{run_id}' is not waiting for approval "
                          f"(waiting: {', '.join(waiting) or 'none'})")
    node = compiled.node(step_id) if step_id in compiled.order else None
    step = node.step if node is not None else None
    if not isinstance(step, ApprovalStep) or node is None:
        raise ResumeError(f"pipeline '{compiled.name}' no longer has approval step "
                          f"'{step_id}'")
    if not approved:
        return Decision(False, by=by, reason=reason)
    if not has_value:
        if step.value is None and step.schema_ is not None:
            raise ResumeError(f"step '{step_id}' puts up no value: approve it with one "
                              f"matching its schema ({T.from_json_schema(step.schema_)})")
        return Decision(True, by=by, reason=reason)
    if step.value is None and step.schema_ is None:
        raise ResumeError(f"step '{step_id}' declares no value (its output is true): "
                          "approve it without one")
    problem = value_problem(step, node.output_type, value)
    if problem is not None:
        raise ResumeError(f"the value for step '{step_id}' {problem}")
    return Decision(True, value, edited=True, by=by, reason=reason)


def value_problem(step: ApprovalStep, declared: T.Type, value: Any) -> str | None:
    """Why an edited value does not fit the step's type (its `schema:`, else the type of
    what it puts up), or None."""
    if step.schema_ is not None:
        from runtime.executor import schema_violation

        problem = schema_violation(step.schema_, value)
        return None if problem is None else f"does not match its schema: {problem}"
    given = T.of_value(value)
    if declared.kind in ("any", given.kind) or (declared.kind == "number"
                                                and given.kind == "integer"):
        return None
    return f"must be {'an' if declared.kind[0] in 'aeiou' else 'a'} {declared}, " \
           f"not {'an' if given.kind[0] in 'aeiou' else 'a'} {given}"


def continued(record: dict[str, Any], new_run_id: str, step_id: str,
              decision: Decision) -> dict[str, Any]:
    """The waiting run's record once decided: status `continued`, with the run that went on."""
    steps = [dict(s, decision={"approved": decision.approved, "by": decision.by,
                               "edited": decision.edited, "reason": decision.reason})
             if s.get("id") == step_id else s
             for s in record.get("metrics", {}).get("steps", [])]
    return {**record, "status": "continued", "continued_in": new_run_id,
            "metrics": {**record.get("metrics", {}), "steps": steps}}

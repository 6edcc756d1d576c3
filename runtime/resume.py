"""Resuming a run (`flowc run --resume RUN_ID`, `POST /v1/runs/{id}/resume`): a new run of
the same pipeline with the same inputs that reuses the recorded output of every step that
succeeded and runs the rest.

A step's recorded output is reused only when the step is the same as when it ran (its
definition's fingerprint matches) and so is everything it read: a step whose producer runs
again runs again too, so no output built from a value that may now differ is kept. Steps
that were skipped are decided again (cheaply: no call) from what they read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from flowc.ir import CompiledPipeline


class ResumeError(ValueError):
    """A run that cannot be resumed as asked: the message says why."""


@dataclass(frozen=True)
class Decision:
    """An approver's answer to an approval step (runtime/approval.py)."""

    approved: bool
    value: Any = None
    edited: bool = False  # ``value`` replaces the proposed one
    by: str | None = None
    reason: str | None = None


@dataclass
class Resume:
    run_id: str | None = None  # the run resumed
    outputs: dict[str, Any] = field(default_factory=dict)  # step id -> output to reuse
    decisions: dict[str, Decision] = field(default_factory=dict)  # approval step -> answer


class Paused(Exception):  # not an error: the run waits
    """An approval step waits for a decision; ``what`` is recorded in the run record."""

    def __init__(self, what: dict[str, Any]) -> None:
        super().__init__("waiting for approval")
        self.what = what


def fingerprints(compiled: CompiledPipeline) -> dict[str, str]:
    """Each step's definition, hashed (computed once per compiled pipeline)."""
    known = compiled.metadata.get("fingerprints")
    if known is None:
        known = {sid: hashlib.sha256(compiled.node(sid).step.model_dump_json(
            by_alias=True).encode()).hexdigest()[:16] for sid in compiled.order}
        compiled.metadata["fingerprints"] = known
    return known


def plan(compiled: CompiledPipeline, run_id: str, record: dict[str, Any],
         decisions: dict[str, Decision] | None = None) -> Resume:
    """What a resume of the run recorded as ``record`` reuses."""
    steps = {s.get("id"): s for s in (record.get("metrics") or {}).get("steps") or []
             if isinstance(s, dict)}
    prints = fingerprints(compiled)
    same: dict[str, bool] = {}  # the step would do what it did: it and its inputs unchanged
    outputs: dict[str, Any] = {}
    for sid in compiled.order:  # producers first
        old = steps.get(sid) or {}
        unchanged = (old.get("fingerprint") == prints[sid]
                     and all(same.get(p, False) for p in compiled.graph.predecessors(sid)))
        if old.get("status") == "done" and unchanged and "output" in old:
            outputs[sid] = old["output"]
            same[sid] = True
        else:  # a skipped step is decided again from the same values: still the same
            same[sid] = unchanged and old.get("status") == "skipped"
    return Resume(run_id, outputs, dict(decisions or {}))


def decided(record: dict[str, Any]) -> dict[str, Decision]:
    """The approval decisions a run was continued with: a continuation of a run that
    waited carries them, so a step decided (and rejected under `on_error: continue`) is
    not put up again when a later approval continues the run."""
    out = {}
    for s in (record.get("metrics") or {}).get("steps") or []:
        d = s.get("decision") if isinstance(s, dict) else None
        if isinstance(d, dict):
            out[s["id"]] = Decision(bool(d.get("approved")), s.get("output"),
                                    bool(d.get("edited")), d.get("by"), d.get("reason"))
    return out


def parse_record(raw: Any) -> dict[str, Any]:
    record = json.loads(raw) if isinstance(raw, str | bytes) else raw
    if not isinstance(record, dict):
        raise ResumeError("the run record is not readable")
    return record


def resumable(run_id: str, record: dict[str, Any], workflow: str,
              inputs: dict[str, Any] | None, inputs_hash_of: Any) -> dict[str, Any]:
    """The inputs to resume ``record`` with: those recorded, or ``inputs`` when given (they
    must be the run's own: their hash is checked). Refuses a run that succeeded, is still
    waiting for an approval (approve or reject it instead), or is of another pipeline."""
    if record.get("workflow") != workflow:
        raise ResumeError(f"run '{run_id}' is a run of pipeline '{record.get('workflow')}', "
                          f"not '{workflow}'")
    status = record.get("status")
    if status == "succeeded":
        raise ResumeError(f"run '{run_id}' succeeded: there is nothing to resume")
    if status == "waiting":
        raise ResumeError(f"run '{run_id}' is waiting for an approval: approve or reject "
                          "its waiting step instead (flowc runs approve RUN_ID STEP)")
    if record.get("dry_run"):
        raise ResumeError(f"run '{run_id}' was a dry run: run it again instead")
    recorded = record.get("inputs")
    if inputs is not None:
        expected = record.get("inputs_hash") or (
            None if recorded is None else inputs_hash_of(recorded))
        if expected is not None and inputs_hash_of(inputs) != expected:
            raise ResumeError(f"the inputs given differ from run '{run_id}'s: a resume "
                              "runs with the same inputs (leave them out to reuse them)")
        return inputs
    if recorded is None:
        raise ResumeError(f"run '{run_id}' did not record its inputs: give them again "
                          "(they are checked against the run's inputs hash)")
    return recorded


async def resume_run(executor: Any, compiled: CompiledPipeline, run_id: str,
                     record: dict[str, Any], inputs: dict[str, Any] | None = None, *,
                     who: Any = None, listener: Any = None,
                     decisions: dict[str, Decision] | None = None,
                     check: bool = True) -> Any:
    """Run ``compiled`` again as a resume of ``run_id`` (recorded as ``record``): a new
    run, linked to it, that reuses what succeeded. ``check=False``: the run's state was
    checked by the caller (an approval continues a waiting run)."""
    from runtime.executor import inputs_hash
    from runtime.inputs import check_inputs

    given = None if inputs is None else check_inputs(compiled.pipeline.inputs, inputs)
    values = (resumable(run_id, record, compiled.name, given, inputs_hash) if check
              else record.get("inputs") or {})
    if not check:  # continuing a waiting run: the decisions it was made with hold
        decisions = {**decided(record), **(decisions or {})}
    return await executor.run(compiled, values, who=who, listener=listener,
                              resume=plan(compiled, run_id, record, decisions))

"""The soundness property (tests/test_soundness.py: what `flowc check` passes runs) for
caching, resume and approval gates: Hypothesis takes the pipelines that test writes, caches
some of their steps, adds approval steps (with and without a value put up and a `schema:`)
and a step that reads them, keeps what the checker passes, and runs each as a dry run and
against the loopback OpenAI server, approving (as put up, or with a value of the declared
type) or rejecting each approval the run waits for until it ends. A run fails only as
declared (a model broke its schema, or an approver rejected); a run again with the same
ledger reuses cached results unchanged at $0; a failed run resumed with schema-valid answers
reuses what succeeded and fails only as declared."""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from flowc import Project, compile_source
from flowc.config import ProjectConfig
from flowc.model import ApprovalStep
from runtime.approval import decide
from runtime.dryrun import DryRunModels, DryRunTools, sample
from runtime.executor import Executor
from runtime.gateway.calls import ModelCaller
from runtime.gateway.routing import Router
from runtime.ledger.store import Ledger
from runtime.providers import Providers
from runtime.resume import Decision, resume_run
from runtime.step_cache import StepCache
from tests.test_soundness import CONFIG, DECLARED, answer, pipelines
from tests.test_soundness import upstream as _upstream

upstream = _upstream
REJECTED = re.compile(r"^rejected by ")


@st.composite
def cases(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, str], dict[str, Any], int]:
    """A pipeline with cached steps and approvals, its answer modes, inputs, and a seed
    for the approvers' choices."""
    doc, modes, inputs = draw(pipelines())
    steps = doc["steps"]
    structured = {s["id"]: sorted(s["response_format"]["schema"]["properties"])
                  for s in steps if "response_format" in s}
    for step in steps:
        choice = draw(st.sampled_from([None, None, True, {"ttl": "1h"}]))
        if choice is not None:
            step["cache"] = choice
    reads: list[str] = []
    for k in range(draw(st.integers(1, 2))):
        aid = f"a{k}"
        approval: dict[str, Any] = {"id": aid, "type": "approval",
                                    "message": f"ok {aid}? ${{{steps[-1]['id']} ?? \"-\"}}"}
        kind = draw(st.sampled_from(["none", "output", "field", "text", "schema_only"]))
        target = draw(st.sampled_from([s["id"] for s in steps]))
        if kind == "output":
            approval["value"] = f"${{{target}}}"
            reads.append(f"${{{aid} ?? \"none\"}}")
            for f in structured.get(target, []):
                reads.append(f"${{{aid}.{f} ?? \"none\"}}")
        elif kind == "field" and structured.get(target):
            field = draw(st.sampled_from(structured[target]))
            approval["value"] = f"${{{target}.{field}}}"
            reads.append(f"${{{aid} ?? \"none\"}}")
        elif kind == "text":
            approval["value"] = f"about ${{{target} ?? \"nothing\"}}"
            reads.append(f"${{{aid} ?? \"none\"}}")
        elif kind == "schema_only":
            approval["schema"] = {"type": "object", "properties": {
                "n": {"type": "integer"}, "note": {"type": "string"}}, "required": ["n"]}
            reads += [f"${{{aid}.n ?? 0}}", f"${{{aid}.note ?? \"none\"}}"]
        else:
            reads.append(f"${{{aid} ?? false}}")
        if draw(st.integers(0, 3)) == 0:
            approval["on_error"] = "continue"
        steps.append(approval)
    steps.append({"id": "s9", "type": "llm", "model": "m",
                  "prompt": "[s9] " + " ".join(reads)})
    modes["s9"] = "valid"
    doc["output"] = "${s9 ?? \"done\"}"
    return doc, modes, inputs, draw(st.integers(0, 2**16))


def _value(step: ApprovalStep, proposed: Any, pick: int) -> dict[str, Any]:
    """What an approver sends: nothing, the value put up again, or a value of the type."""
    if step.schema_ is not None and step.value is None:
        return {"value": sample(step.schema_) if pick % 2 else {"n": 3, "note": "edited"}}
    if step.value is None or pick % 3 == 0:
        return {}
    return {"value": proposed}


async def _until_done(ex: Executor, compiled: Any, result: Any, seed: int) -> Any:
    """Decide every approval the run waits for, continuing it, until it stops waiting."""
    for round_ in range(8):
        if result.status != "waiting":
            return result
        record = json.loads(json.dumps(result.to_dict(), default=str))
        decisions: dict[str, Decision] = {}
        for s in record["metrics"]["steps"]:
            if s["status"] != "waiting" or "waiting_for" not in s:
                continue
            pick = (seed >> (round_ * 2 + len(decisions))) & 7
            step = compiled.node(s["id"]).step
            if pick == 7:
                decisions[s["id"]] = decide(compiled, result.run_id, record, s["id"],
                                            approved=False, reason="no")
                continue
            given = _value(step, s["waiting_for"]["value"], pick)
            decisions[s["id"]] = decide(compiled, result.run_id, record, s["id"],
                                        approved=True, value=given.get("value"),
                                        has_value="value" in given)
        result = await resume_run(ex, compiled, result.run_id, record, check=False,
                                  decisions=decisions)
    raise AssertionError("a run kept waiting: "
                         f"{[(r.id, r.status, r.marks) for r in result.steps.values()]}")


def _broken(result: Any) -> list[str]:
    return [f"{sid}: {r.error}" for sid, r in result.steps.items()
            if r.status == "failed" and not (DECLARED.search(r.error or "")
                                             or REJECTED.search(r.error or ""))]


def _run_all(compiled: Any, inputs: dict[str, Any], upstream: Any, modes: dict[str, str],
             seed: int) -> tuple[Any, Any, Any, Any]:
    async def go() -> tuple[Any, Any, Any, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            ledger = Ledger(Path(tmp) / "ledger.duckdb", 0.1)
            config = ProjectConfig.model_validate(CONFIG)
            providers = Providers(config, env={"OPENAI_BASE_URL": upstream.url + "/v1",
                                               "OPENAI_API_KEY": "k"})
            try:
                dry = await _until_done(Executor(DryRunModels(ledger), DryRunTools(),
                                                 dry_run=True), compiled,
                                        await Executor(DryRunModels(ledger), DryRunTools(),
                                                       dry_run=True).run(compiled, inputs),
                                        seed)
                ex = Executor(ModelCaller(config, providers, Router(config, providers),
                                          ledger), None, cache=StepCache(ledger))
                upstream.script.clear()
                upstream.then(*[answer(modes)] * 200)
                first = await _until_done(ex, compiled, await ex.run(compiled, inputs), seed)
                again = await ex.run(compiled, inputs)  # the cached steps: from the cache
                resumed = None
                if first.status == "failed":
                    upstream.script.clear()
                    upstream.then(*[answer(dict.fromkeys(modes, "valid"))] * 200)
                    record = json.loads(json.dumps(first.to_dict(), default=str))
                    resumed = await _until_done(
                        ex, compiled, await resume_run(ex, compiled, first.run_id, record),
                        seed)
                return dry, first, again, resumed
            finally:
                await providers.close()
                ledger.close()

    return asyncio.run(go())


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow,
                                 HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_cached_resumed_and_approved_pipelines_run_as_checked(case, upstream):
    doc, modes, inputs, seed = case
    text = yaml.safe_dump(doc, sort_keys=False)
    result = compile_source(text, "generated.yaml",
                            Project(config=ProjectConfig.model_validate(CONFIG)))
    assume(result.compiled is not None)
    compiled = result.compiled
    try:
        dry, first, again, resumed = _run_all(compiled, inputs, upstream, modes, seed)
    except AssertionError as exc:
        raise AssertionError(f"{text}\nmodes {modes}, inputs {inputs}: {exc}") from None
    assert dry.status in ("succeeded", "failed"), (text, dry.status)
    assert not _broken(dry), (text, _broken(dry))
    if dry.status == "failed":  # only an approver's rejection fails a dry run
        assert REJECTED.search(dry.error["message"]), (text, dry.error)
    assert not _broken(first), (text, modes, _broken(first))
    assert first.status in ("succeeded", "failed"), (text, first.status)
    event(f"first run {first.status}; {sum(r.cached for r in again.steps.values())} cached "
          "in the second")
    for sid, r in again.steps.items():
        if r.cached:  # a hit returns what the call returned, at $0
            assert r.cost == 0 and r.model_calls == 0, (text, sid)
            if first.steps[sid].status == "done" and first.steps[sid].cached is False:
                assert r.output == first.steps[sid].output, (text, sid)
    if resumed is not None:
        assert not _broken(resumed), (text, _broken(resumed))
        # (a continuation after an approval reuses from the run that waited, not `first`)
        reused = [sid for sid, r in resumed.steps.items()
                  if r.marks.get("resumed_from") == first.run_id]
        assert all(first.steps[sid].status == "done" for sid in reused), text
        assert all(resumed.steps[sid].cost == 0 for sid in reused), text
        if resumed.status == "failed":
            assert REJECTED.search(resumed.error["message"] or "") or any(
                REJECTED.search(r.error or "") for r in resumed.steps.values()), (
                text, resumed.error)

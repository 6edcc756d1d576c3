"""Pipelines over HTTP: list, register (admin), run (charged to the caller's key), and the
run records (a key sees its own team's runs)."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from runtime import rungraph, runlist, runs
from runtime.api.auth import Access, Admin, Caller
from runtime.api.common import current, json_response, query, report
from runtime.gateway.openai_api import error_response
from runtime.inputs import InputError
from runtime.providers import FlowcError, RequestError
from runtime.workflows import BreaksCallers, NameIsAFile

router = APIRouter()


@router.get("/v1/workflows")
async def workflows(request: Request, a: Caller) -> Response:
    listed = current(request).registry.describe()
    key = a.who.key
    if key is not None:
        listed = [w for w in listed if key.allows_pipeline(str(w.get("name")))]
    return json_response({"workflows": listed})


@router.put("/v1/workflows/{name}")
async def register(name: str, request: Request, _: Admin) -> Response:
    rt = current(request)
    raw = (await request.body()).decode("utf-8", errors="replace")
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            raw = str(orjson.loads(raw)["yaml"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return error_response(RequestError('send the pipeline as YAML, or as JSON '
                                               '{"yaml": "..."}'))
    try:
        await asyncio.to_thread(rt.refresh_tools)  # a tool discovered a moment ago elsewhere
        result = await asyncio.to_thread(rt.registry.register, name, raw, rt.ledger)
    except BreaksCallers as exc:  # each finding names the caller it is in
        return JSONResponse({"error": {
            "message": str(exc), "type": "invalid_request_error", "code": "breaks_callers",
            "diagnostics": [{**d.to_dict(), "pipeline": caller}
                            for caller, found in exc.errors.items() for d in found]}},
            status_code=422)
    except NameIsAFile as exc:
        return error_response(RequestError(str(exc), status=409, code="workflow_is_a_file"))
    except ValueError as exc:
        return error_response(RequestError(str(exc)))
    if result.compiled is None:
        return JSONResponse({"error": {
            "message": f"pipeline '{name}' does not compile",
            "type": "invalid_request_error", "code": "compile_error",
            "diagnostics": [d.to_dict() for d in result.diagnostics]}}, status_code=422)
    return JSONResponse({"name": name, "registered": True,
                         "warnings": [d.to_dict() for d in result.diagnostics]})


def _max_cost(body: dict[str, Any]) -> Decimal | None:
    """The request's own `max_cost_usd`: a cap on this run, beside the pipeline's."""
    value = body.get("max_cost_usd")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise RequestError("'max_cost_usd' must be an amount in USD", param="max_cost_usd")
    try:
        cap = Decimal(str(value))
    except ArithmeticError:
        cap = Decimal("NaN")
    if not cap.is_finite() or cap < 0:
        raise RequestError(f"'max_cost_usd' must be an amount in USD (>= 0), not {value!r}",
                           param="max_cost_usd")
    return cap


@router.post("/v1/workflow/{name}")
async def run(name: str, request: Request, a: Caller) -> Response:
    rt = current(request)
    wf = rt.registry.workflows.get(name)
    if wf is None:
        known = ", ".join(sorted(n for n in rt.registry.workflows
                                 if a.who.key is None or a.who.key.allows_pipeline(n)))
        return error_response(RequestError(f"no pipeline named '{name}' (serving: "
                                           f"{known or 'none'})", status=404,
                                           code="workflow_not_found"))
    a.may_run(name)
    try:
        body = orjson.loads(await request.body() or b"{}")
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        inputs = body.get("input") or {}
        if not isinstance(inputs, dict):
            raise RequestError("'input' must be an object", param="input")
        dry_run = bool(body.get("dry_run", False))
        result = await rt.executor(dry_run).run(wf.compiled, inputs, who=a.who,
                                                max_cost_usd=_max_cost(body))
    except orjson.JSONDecodeError:
        return error_response(RequestError("the request body is not valid JSON"))
    except InputError as exc:
        return JSONResponse({"error": {"message": str(exc), "type": "invalid_request_error",
                                       "code": "invalid_input", "param": "input",
                                       "problems": exc.problems}}, status_code=400)
    except RequestError as exc:
        return error_response(exc)
    key = a.who.key
    await asyncio.to_thread(runs.save, rt.ledger, result, key.id if key else None,
                            key.team if key else None)
    # A failed run is a result (200): see its "status" and "error".
    return json_response(result.to_dict())


def _runs_scope(a: Access) -> tuple[str, list[Any]]:
    scope = a.data_scope()
    if "team" in scope:
        return "team = ?", [scope["team"]]
    if "key_id" in scope:
        return "key_id = ?", [scope["key_id"]]
    return "TRUE", []


@router.get("/v1/runs/{run_id}")
async def run_record(run_id: str, request: Request, a: Caller) -> Response:
    where, params = _runs_scope(a)
    rows = await query(current(request), f"SELECT record FROM runs WHERE id = ? AND {where}",
                       [run_id, *params])
    if not rows:  # another team's run is as unknown as a missing one
        return error_response(RequestError(f"no run '{run_id}'", status=404))
    return Response(rows[0][0], media_type="application/json")


@router.get("/v1/runs")
async def run_list(request: Request, a: Caller, workflow: str | None = None,
                   status: str | None = None, since: str | None = None,
                   until: str | None = None, team: str | None = None, key: str | None = None,
                   run_id: str | None = None, limit: int = 50) -> Response:
    """Recent runs, newest first, narrowed by pipeline, status, time, team and key (within
    what the caller may see), with the values each filter can take."""
    whose = a.filters(team, key, None)
    data = await report(current(request), runlist.recent, workflow=workflow, status=status,
                        since=since, until=until, team=whose["team"], key_id=whose["key_id"],
                        run_id=run_id, limit=limit, scope=a.data_scope())
    return json_response(data)


@router.get("/v1/runs/{run_id}/graph.svg")
async def run_graph(run_id: str, request: Request, a: Caller) -> Response:
    """The run drawn over its pipeline's DAG, each step coloured by status (runtime/rungraph.py).
    `x-flowc-graph-note` says when it was drawn from the run record instead."""
    rt = current(request)
    where, params = _runs_scope(a)
    rows = await query(rt, f"SELECT record FROM runs WHERE id = ? AND {where}",
                       [run_id, *params])
    if not rows:
        return error_response(RequestError(f"no run '{run_id}'", status=404))
    record = orjson.loads(rows[0][0])
    workflows = {name: wf.compiled for name, wf in rt.registry.workflows.items()}
    try:
        svg, note = await asyncio.to_thread(rungraph.run_svg, record, workflows)
    except rungraph.GraphUnavailable as exc:
        err = FlowcError(str(exc))
        err.status, err.code = 503, "graphviz_missing"
        return error_response(err)
    headers = {"x-flowc-graph-note": note.encode("ascii", "replace").decode()} if note else {}
    return Response(svg, media_type="image/svg+xml", headers=headers)


@router.post("/v1/runs/{run_id}/resume")
async def resume_run(run_id: str, request: Request, a: Caller) -> Response:
    """A new run that reuses what the run's steps produced and runs the rest
    (runtime/api/run_control.py)."""
    from runtime.api import run_control

    return await run_control.resume(request, a, run_id, *_runs_scope(a))


@router.post("/v1/runs/{run_id}/steps/{step_id}/approve")
async def approve_step(run_id: str, step_id: str, request: Request, a: Caller) -> Response:
    """Approve a waiting approval step (`{"value": ...}`: an edited value); the run goes on
    as a new run that resumes it."""
    from runtime.api import run_control

    return await run_control.decide(request, a, run_id, step_id, *_runs_scope(a),
                                    approved=True)


@router.post("/v1/runs/{run_id}/steps/{step_id}/reject")
async def reject_step(run_id: str, step_id: str, request: Request, a: Caller) -> Response:
    """Reject a waiting approval step (`{"reason": ...}`): the step fails, and the run
    with it unless the step says `on_error: continue`."""
    from runtime.api import run_control

    return await run_control.decide(request, a, run_id, step_id, *_runs_scope(a),
                                    approved=False)

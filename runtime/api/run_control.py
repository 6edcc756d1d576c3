"""Continuing recorded runs over HTTP: resume (`POST /v1/runs/{id}/resume`) and approval
decisions (`POST /v1/runs/{id}/steps/{step}/approve|reject`). The routes are in
runtime/api/workflows.py; the work is here.

Who may: whoever may see the run (an admin, or a key of the run's team or the key itself)
and may run its pipeline now (`Access.may_run`: not read-only, the pipeline allowed). The
new run is charged to the caller, like a run it started."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import Request
from starlette.responses import Response

from runtime import runs
from runtime.api.auth import Access
from runtime.api.common import current, json_response, query
from runtime.gateway.openai_api import error_response
from runtime.inputs import InputError
from runtime.providers import RequestError
from runtime.resume import ResumeError, parse_record, resume_run

_CONTINUING: set[str] = set()  # runs being resumed or decided in this process


async def body_of(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.body() or b"{}")
    except orjson.JSONDecodeError:
        raise RequestError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


async def run_record(request: Request, run_id: str, where: str, params: list[Any]
                     ) -> dict[str, Any]:
    rows = await query(current(request), f"SELECT record FROM runs WHERE id = ? AND {where}",
                       [run_id, *params])
    if not rows:  # another team's run is as unknown as a missing one
        raise RequestError(f"no run '{run_id}'", status=404)
    return parse_record(rows[0][0])


async def continue_run(request: Request, a: Access, run_id: str, record: dict[str, Any],
                       inputs: dict[str, Any] | None, **kw: Any) -> Response:
    """Run the pipeline of ``record`` again as a resume of it, and record the new run."""
    rt = current(request)
    name = str(record.get("workflow"))
    wf = rt.registry.workflows.get(name)
    if wf is None:
        raise RequestError(f"run '{run_id}' is of pipeline '{name}', which this server no "
                           "longer serves", status=409, code="workflow_not_found")
    a.may_run(name)
    if run_id in _CONTINUING:
        raise RequestError(f"run '{run_id}' is being continued already", status=409,
                           code="run_busy")
    _CONTINUING.add(run_id)
    try:
        result = await resume_run(rt.executor(), wf.compiled, run_id, record, inputs,
                                  who=a.who, **kw)
    except InputError as exc:
        return Response(orjson.dumps({"error": {
            "message": str(exc), "type": "invalid_request_error", "code": "invalid_input",
            "param": "input", "problems": exc.problems}}), status_code=400,
            media_type="application/json")
    except ResumeError as exc:
        raise RequestError(str(exc), status=409, code="not_resumable") from None
    finally:
        _CONTINUING.discard(run_id)
    key = a.who.key
    await asyncio.to_thread(runs.save, rt.ledger, result, key.id if key else None,
                            key.team if key else None)
    return json_response(result.to_dict())


async def resume(request: Request, a: Access, run_id: str, where: str, params: list[Any]
                 ) -> Response:
    try:
        body = await body_of(request)
        inputs = body.get("input")
        if inputs is not None and not isinstance(inputs, dict):
            raise RequestError("'input' must be an object", param="input")
        record = await run_record(request, run_id, where, params)
        return await continue_run(request, a, run_id, record, inputs)
    except RequestError as exc:
        return error_response(exc)


async def decide(request: Request, a: Access, run_id: str, step_id: str, where: str,
                 params: list[Any], *, approved: bool) -> Response:
    """Approve (`{"value": ...}` optional: an edited value) or reject (`{"reason": ...}`)
    a waiting approval step; the run continues as a new run that resumes it."""
    from runtime.approval import continued
    from runtime.approval import decide as decision_for

    rt = current(request)
    try:
        body = await body_of(request)
        record = await run_record(request, run_id, where, params)
        wf = rt.registry.workflows.get(str(record.get("workflow")))
        if wf is None:
            raise RequestError(f"run '{run_id}' is of pipeline '{record.get('workflow')}', "
                               "which this server no longer serves", status=409,
                               code="workflow_not_found")
        reason = body.get("reason", body.get("note"))
        if reason is not None and not isinstance(reason, str):
            raise RequestError("'reason' must be a string", param="reason")
        key = a.who.key
        by = f"key '{key.name}'" if key is not None else "admin" if a.who.kind == "admin" \
            else None
        try:
            decision = decision_for(wf.compiled, run_id, record, step_id, approved=approved,
                                    value=body.get("value"), has_value="value" in body,
                                    by=by, reason=reason)
        except ResumeError as exc:
            raise RequestError(str(exc), status=409, code="not_waiting") from None
        response = await continue_run(request, a, run_id, record, None, check=False,
                                      decisions={step_id: decision})
        if response.status_code == 200:
            new_id = orjson.loads(response.body)["run_id"]
            await query(rt, "UPDATE runs SET status = 'continued', record = ? WHERE id = ?",
                        [orjson.dumps(continued(record, new_id, step_id, decision),
                                      default=str).decode(), run_id])
        return response
    except RequestError as exc:
        return error_response(exc)

"""Spend: reports over the ledger, SQL for the admin, the dashboard and budget alerts. A
key reads its own team's rows only (its own rows when it has no team)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from runtime.api.auth import Admin, Caller
from runtime.api.common import current, json_response, ledger_unavailable, query, report
from runtime.gateway.openai_api import error_response
from runtime.ledger import reports
from runtime.ledger.store import LedgerUnavailable, QueryTimeout, SQLRefused
from runtime.providers import RequestError

DASHBOARD = Path(__file__).parent.parent / "dashboard" / "index.html"
router = APIRouter()


@router.get("/v1/costs/summary")
async def summary(request: Request, a: Caller, since: str | None = None,
                  until: str | None = None, by: str = "day", team: str | None = None,
                  key: str | None = None, tag: str | None = None,
                  instance: str | None = None) -> Response:
    data = await report(current(request), reports.summary, since, until, by,
                        **a.filters(team, key, tag), instance=instance)
    return json_response(data)


@router.get("/v1/costs/dashboard")
async def dashboard_data(request: Request, a: Caller, since: str | None = None,
                         until: str | None = None, team: str | None = None,
                         key: str | None = None, tag: str | None = None,
                         instance: str | None = None) -> Response:
    data = await report(current(request), reports.dashboard, since, until,
                        **a.filters(team, key, tag), instance=instance)
    return json_response(data)


@router.get("/dashboard")
async def dashboard() -> Response:
    # The page itself is open (it asks for a key); its data is /v1/costs/dashboard.
    return Response(DASHBOARD.read_bytes(), media_type="text/html; charset=utf-8")


@router.get("/v1/costs/export.csv")
async def export(request: Request, a: Caller, since: str | None = None,
                 until: str | None = None, team: str | None = None, key: str | None = None,
                 tag: str | None = None, instance: str | None = None) -> Response:
    text = await report(current(request), reports.export_csv, since, until,
                        **a.filters(team, key, tag), instance=instance)
    return Response(text, media_type="text/csv",
                    headers={"content-disposition": 'attachment; filename="costs.csv"'})


@router.post("/v1/costs/sql")
async def sql(request: Request, _: Admin) -> Response:
    ledger = current(request).ledger
    try:
        body = orjson.loads(await request.body())
        columns, rows = await asyncio.to_thread(ledger.select, str(body["sql"]),
                                                list(body.get("params") or []))
    except SQLRefused as exc:
        return error_response(RequestError(str(exc), code="sql_refused"))
    except QueryTimeout as exc:
        return error_response(RequestError(str(exc), code="sql_timeout"))
    except LedgerUnavailable as exc:
        return error_response(ledger_unavailable(exc))
    except Exception as exc:  # a user's SQL error is a 400 with DuckDB's message
        return error_response(RequestError(f"query failed: {exc}", code="sql_error"))
    return json_response({"columns": columns, "rows": rows})


ALERT_COLUMNS = ("ts", "scope_kind", "scope_name", "threshold", "limit_usd", "spent_usd",
                 "period", "period_start")


@router.get("/v1/alerts")
async def alerts(request: Request, a: Caller, limit: int = 100) -> Response:
    """Budget alerts fired (50/80/100% of a limit), newest first: every one for an admin,
    a key's own and its team's for a key."""
    where, params = "", []
    key = a.who.key
    if not a.admin and key is not None:
        where = "WHERE (scope_kind = 'key' AND scope_name = ?)"
        params.append(key.id)
        if key.team:
            where += " OR (scope_kind = 'team' AND scope_name = ?)"
            params.append(key.team)
    rows = await query(current(request), f"SELECT {', '.join(ALERT_COLUMNS)} FROM alerts "
                       f"{where} ORDER BY ts DESC LIMIT ?", [*params, max(0, min(limit, 1000))])
    return json_response({"alerts": [dict(zip(ALERT_COLUMNS, r, strict=True))
                                     for r in rows]})

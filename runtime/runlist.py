"""Recent runs with filters (pipeline, status, time range, team, key), for `GET /v1/runs`
and the dashboard's runs list: each run with its totals and how many steps ended how, and
the values the filters can take among the runs the caller may see."""

from __future__ import annotations

from typing import Any

from runtime.ledger.reports import Select, time_range

# `waiting`: an approval step waits for a decision; `continued`: decided, and run on as a
# new run (its record names it). See runtime/approval.py.
RUN_STATUSES = ("succeeded", "failed", "cancelled", "waiting", "continued")
COLUMNS = ("run_id", "workflow", "status", "started_at", "latency_ms", "dry_run", "key_id",
           "team", "key_name", "cost_usd", "tokens", "step_statuses")


def _where(workflow: str | None, status: str | None, since: str | None, until: str | None,
           team: str | None, key_id: str | None, run_id: str | None = None
           ) -> tuple[str, list[Any]]:
    """Values are parameters, never SQL text; a bad status or time is the caller's error."""
    if status is not None and status not in RUN_STATUSES:
        raise ValueError(f"status must be one of {', '.join(RUN_STATUSES)}, not {status!r}")
    clauses: list[str] = ["TRUE"]
    params: list[Any] = []
    for clause, value in (("r.workflow_name = ?", workflow), ("r.status = ?", status),
                          ("r.team = ?", team), ("r.key_id = ?", key_id),
                          ("r.id = ?", run_id)):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    clauses += time_range("r.started_at", since, until, params)
    return " AND ".join(clauses), params


def _counts(statuses: Any) -> dict[str, int]:
    """``{"done": 3, "skipped": 1}`` from the record's list of step statuses."""
    out: dict[str, int] = {}
    for s in statuses or ():
        s = str(s).strip('"')
        out[s] = out.get(s, 0) + 1
    return out


def recent(select: Select, *, workflow: str | None = None, status: str | None = None,
           since: str | None = None, until: str | None = None, team: str | None = None,
           key_id: str | None = None, run_id: str | None = None, limit: int = 50,
           scope: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs newest first, narrowed by the filters (``run_id``: that one run's row); ``scope``
    (team or key_id) is what the caller may see at all, and bounds the filters' choices."""
    where, params = _where(workflow, status, since, until, team, key_id, run_id)
    # The page of runs first, then their records read: reading every record's JSON before
    # the top-N took seconds at 100,000 runs.
    _, rows = select(
        "SELECT r.id, r.workflow_name, r.status, r.started_at, r.latency_ms, r.dry_run, "
        "r.key_id, r.team, k.name, "
        "CAST(json_extract(r.record, '$.metrics.total_cost_usd') AS DOUBLE), "
        "CAST(json_extract(r.record, '$.metrics.total_tokens') AS BIGINT), "
        "json_extract_string(r.record, '$.metrics.steps[*].status') "
        f"FROM (SELECT * FROM runs r WHERE {where} ORDER BY r.started_at DESC, r.id "
        "LIMIT ?) r LEFT JOIN keys k ON k.id = r.key_id ORDER BY r.started_at DESC, r.id",
        [*params, max(0, min(limit, 1000))])
    runs = []
    for row in rows:
        run = dict(zip(COLUMNS, row, strict=True))
        run["step_statuses"] = _counts(run["step_statuses"])
        runs.append(run)
    return {"runs": runs, "filters": choices(select, scope or {})}


def choices(select: Select, scope: dict[str, str]) -> dict[str, Any]:
    """The pipelines, statuses, teams and keys found among the runs in ``scope``."""
    where, params = _where(None, None, None, None, scope.get("team"), scope.get("key_id"))
    _, rows = select("SELECT DISTINCT r.workflow_name, r.status, r.team, r.key_id, k.name "
                     f"FROM runs r LEFT JOIN keys k ON k.id = r.key_id WHERE {where}", params)
    keys = {kid: name for *_, kid, name in rows if kid is not None}
    return {"workflow": sorted({r[0] for r in rows}),
            "status": [s for s in RUN_STATUSES if any(r[1] == s for r in rows)],
            "team": sorted({r[2] for r in rows if r[2] is not None}),
            "key": [{"id": k, "name": n} for k, n in sorted(keys.items(),
                                                           key=lambda kv: (kv[1] or "", kv[0]))]}

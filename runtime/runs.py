"""Run records: what happened in a run, kept so `flowc runs` and `GET /v1/runs/{id}` can
show it afterwards (including why each skipped step was skipped). With a shared store they
are in Postgres, readable from every instance."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from runtime.executor import RunResult
from runtime.ledger.store import Ledger

if TYPE_CHECKING:
    from runtime.pg.ledger import PgLedger


def run_row(result: RunResult, key_id: str | None = None, team: str | None = None
            ) -> dict[str, Any]:
    """``key_id``/``team``: who ran it (the caller's key, over HTTP)."""
    started = datetime.fromtimestamp(result.started_at, UTC).replace(tzinfo=None)
    finished = datetime.fromtimestamp(result.started_at + result.latency_ms / 1000,
                                      UTC).replace(tzinfo=None)
    return {"id": result.run_id, "workflow_name": result.workflow,
            "inputs_hash": result.inputs_hash, "status": result.status,
            "started_at": started, "finished_at": finished, "latency_ms": result.latency_ms,
            "dry_run": result.dry_run, "record": result.to_dict(), "key_id": key_id,
            "team": team}


def save(ledger: Ledger | PgLedger | None, result: RunResult, key_id: str | None = None,
         team: str | None = None) -> None:
    if ledger is not None:
        ledger.record_run(run_row(result, key_id, team))

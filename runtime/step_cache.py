"""Step caching (`cache:` on a step, docs/dsl.md): a step's result kept in the ledger's
`step_cache` table, keyed by the SHA-256 of its rendered request as canonical JSON, and
reused by an identical call later instead of calling again.

The cache lives in the ledger file, so only the process that holds it (`flowc serve`, or a
`flowc run` with no server running) can use it; elsewhere every lookup misses (logged once)
and nothing is stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from runtime.ledger.store import Ledger, LedgerUnavailable

log = logging.getLogger("flowc.cache")


def cache_key(kind: str, request: dict[str, Any]) -> str:
    """SHA-256 of ``{"kind": kind, "request": request}`` as canonical JSON (sorted keys, no
    spaces, UTF-8): equal requests get equal keys whatever their keys' order."""
    text = json.dumps({"kind": kind, "request": request}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    """A cached result and what producing it cost."""

    output: Any
    cost: Decimal | None
    tokens: int
    model: str | None
    provider: str | None
    served_model: str | None
    created_at: datetime


class StepCache:
    def __init__(self, ledger: Ledger | None) -> None:
        self.ledger = ledger
        self._warned = False

    def _unavailable(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            log.warning("step cache unavailable, every lookup misses: %s", exc)

    async def get(self, key: str, ttl: int | None) -> Entry | None:
        """The entry for ``key`` stored less than ``ttl`` seconds ago (any age: None)."""
        if self.ledger is None:
            return None
        sql = ("SELECT output, cost_usd, tokens, model, provider, served_model, created_at "
               "FROM step_cache WHERE key = ?")
        params: list[Any] = [key]
        if ttl is not None:
            sql += " AND created_at > ?"
            params.append(_now() - timedelta(seconds=ttl))
        try:
            rows = await asyncio.to_thread(self.ledger.execute, sql, params)
        except LedgerUnavailable as exc:
            self._unavailable(exc)
            return None
        except Exception as exc:  # a cache that cannot be read is a miss, not a failed step
            self._unavailable(exc)
            return None
        if not rows:
            return None
        output, cost, tokens, model, provider, served, created = rows[0]
        return Entry(json.loads(output), cost, tokens or 0, model, provider, served, created)

    async def put(self, key: str, entry: Entry, *, workflow: str, step_id: str,
                  run_id: str) -> None:
        if self.ledger is None:
            return
        try:
            await asyncio.to_thread(
                self.ledger.execute,
                # ON CONFLICT: the upsert DuckDB and Postgres (`--store`) both take
                "INSERT INTO step_cache (key, workflow_name, step_id, run_id, "
                "model, provider, served_model, output, cost_usd, tokens, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
                "workflow_name = excluded.workflow_name, step_id = excluded.step_id, "
                "run_id = excluded.run_id, model = excluded.model, "
                "provider = excluded.provider, served_model = excluded.served_model, "
                "output = excluded.output, cost_usd = excluded.cost_usd, "
                "tokens = excluded.tokens, created_at = excluded.created_at",
                [key, workflow, step_id, run_id, entry.model, entry.provider,
                 entry.served_model, json.dumps(entry.output, ensure_ascii=False, default=str),
                 entry.cost, entry.tokens, entry.created_at])
        except LedgerUnavailable as exc:
            self._unavailable(exc)
        except Exception:  # a result that cannot be stored is not a failed step
            log.exception("step cache: could not store the result of step '%s'", step_id)


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def entry_now(output: Any, cost: Decimal | None, tokens: int, model: str | None = None,
              provider: str | None = None, served_model: str | None = None) -> Entry:
    return Entry(output, cost, tokens, model, provider, served_model, _now())


def elapsed_ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def clear(ledger: Any, *, pipeline: str | None = None, step: str | None = None,
          older_than: int | None = None) -> int:
    """Delete cache entries (`flowc cache clear`, `DELETE /v1/cache`): those of a pipeline,
    of a step (its id, as in `step_id`), stored more than ``older_than`` seconds ago, or all
    of them; how many. A later identical call is a miss and stores its result again."""
    where, params = ["TRUE"], []
    if pipeline is not None:
        where.append("workflow_name = ?")
        params.append(pipeline)
    if step is not None:
        where.append("step_id = ?")
        params.append(step)
    if older_than is not None:
        where.append("created_at < ?")
        params.append(_now() - timedelta(seconds=older_than))
    condition = " AND ".join(where)
    count = ledger.execute(f"SELECT count(*) FROM step_cache WHERE {condition}", params)[0][0]
    if count:
        ledger.execute(f"DELETE FROM step_cache WHERE {condition}", params)
    return int(count)

"""Where keys, spend and alerts live: one small interface, kept in the ledger file today
(a Postgres implementation serves many instances sharing one store)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

from flowc.cost import amount
from runtime.access.budgets import ZERO, Alert, Budgets, Scope
from runtime.access.keys import Key

# How each kind of budget finds its rows in the ledger.
_SCOPE_WHERE = {
    "key": "key_id = ?",
    "team": "team = ?",
    "tag": "list_contains(string_split(tags, ','), ?)",
    "pipeline": "workflow_name = ?",
}
_KEY_COLUMNS = ("id", "name", "hash", "hint", "team", "budget_usd", "period", "rpm", "tpm",
                "models", "pipelines", "read_only", "tags", "created_at", "expires_at",
                "revoked_at")


class AccessStore(Protocol):
    def load_keys(self) -> list[Key]: ...

    def save_key(self, key: Key, base: Key | None = None) -> None:
        """Save ``key``, a change worked out from ``base`` (the key as the change read it;
        None: a new key, or no check). A store several processes change raises
        KeyChanged when its copy is no longer ``base``; in one process the gate makes
        changes one at a time (`Gate.changing`), so the ledger's store has nothing to
        check."""
        ...

    def spend(self, scope: Scope, since: datetime) -> Decimal:
        """What ``scope`` spent since ``since``, summed from the ledger's rows."""
        ...

    def add_alert(self, alert: Alert) -> bool | None:
        """Record an alert; False: another instance already did (and sent it)."""
        ...


class SharedStore(AccessStore, Protocol):
    """A store several instances share (runtime/pg/access.py): the gate takes its budget
    counters from it, whose limits hold across instances, and attaches to it so that key
    changes and rate-limit shares reach it from the others."""

    def make_budgets(self, thresholds: Iterable[int],
                     alert: Callable[[Alert], None] | None) -> Budgets: ...

    def attach(self, gate: Any) -> None: ...

    def status(self) -> dict[str, Any]: ...

    async def aclose(self) -> None:
        """Settle, hand back what it holds of the budgets, stop syncing."""
        ...


class Execute(Protocol):
    def execute(self, sql: str, params: Any = ...) -> list[tuple[Any, ...]]: ...


def _naive(t: datetime | None) -> datetime | None:
    """The ledger keeps UTC times without a zone."""
    return None if t is None else t.astimezone(UTC).replace(tzinfo=None)


def _aware(t: datetime | None) -> datetime | None:
    return None if t is None else t.replace(tzinfo=UTC)


class LedgerAccessStore:
    """Keys, alerts and spend in the ledger's DuckDB file (through `Ledger.execute`, which
    runs in the ledger process while a server holds the file)."""

    def __init__(self, ledger: Execute) -> None:
        self.ledger = ledger

    def load_keys(self) -> list[Key]:
        rows = self.ledger.execute(f"SELECT {', '.join(_KEY_COLUMNS)} FROM keys ORDER BY "
                                   "created_at")
        keys = []
        for r in rows:
            v = dict(zip(_KEY_COLUMNS, r, strict=True))
            keys.append(Key(
                id=v["id"], name=v["name"], hash=v["hash"], hint=v["hint"] or "",
                team=v["team"], budget_usd=v["budget_usd"], period=v["period"] or "month",
                rpm=v["rpm"], tpm=v["tpm"], models=tuple(v["models"] or ()),
                pipelines=tuple(v["pipelines"] or ()), read_only=bool(v["read_only"]),
                tags=tuple(v["tags"] or ()), created_at=_aware(v["created_at"]),  # type: ignore[arg-type]
                expires_at=_aware(v["expires_at"]), revoked_at=_aware(v["revoked_at"])))
        return keys

    def save_key(self, key: Key, base: Key | None = None) -> None:
        self.ledger.execute(
            f"INSERT OR REPLACE INTO keys ({', '.join(_KEY_COLUMNS)}) VALUES "
            f"({', '.join('?' for _ in _KEY_COLUMNS)})",
            [key.id, key.name, key.hash, key.hint, key.team,
             amount(key.budget_usd) if key.budget_usd is not None else None, key.period,
             key.rpm, key.tpm, list(key.models), list(key.pipelines), key.read_only,
             list(key.tags), _naive(key.created_at), _naive(key.expires_at),
             _naive(key.revoked_at)])

    def spend(self, scope: Scope, since: datetime) -> Decimal:
        rows = self.ledger.execute(
            f"SELECT coalesce(sum(cost_usd), 0) FROM requests WHERE {_SCOPE_WHERE[scope.kind]} "
            "AND ts >= ?", [scope.name, _naive(since)])
        return Decimal(rows[0][0]) if rows else ZERO

    def add_alert(self, alert: Alert) -> None:
        self.ledger.execute(
            "INSERT INTO alerts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [_naive(datetime.now(UTC)), alert.scope.kind, alert.scope.name, alert.threshold,
             amount(alert.limit), amount(alert.spent), alert.period, _naive(alert.period_start)])

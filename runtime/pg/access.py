"""Keys, budgets, rate limits and alerts shared by every `flowc serve` on one Postgres.

Budgets stay exact without a hot row: an instance leases a slice of a budget's headroom
in one atomic statement (`spent + leased + need <= limit`), reserves and charges requests
against its lease in memory (the same reserve-worst-case, charge-actual rule as on one
node), and every `TICK` seconds settles what it charged and hands back what it does not
need, in one transaction for all its budgets. Slices shrink as a budget nears its end
(at most half an even share of what is left among the live instances), so the leases of
all instances together never pass the limit. A lease is renewed on each tick; one left by a
killed instance expires after `LEASE_TTL` and its unsettled rest counts as spent (it may
have been spent: a budget is never passed, at worst under-used by that rest).

Rate limits: each live instance admits its share of a key's rpm/tpm (the limit split by
the number of instances seen in the last `LIVE` seconds). Keys changed on one instance
reach the others by a poll of a version column on each tick. See docs/scaling.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import uuid
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import TYPE_CHECKING, Any

from runtime.access.budgets import (
    ZERO,
    Alert,
    BudgetExceeded,
    Budgets,
    Counter,
    LeaseNeeded,
    Scope,
    period_end,
    period_start,
)
from runtime.access.gate import Denied
from runtime.access.keys import Key, KeyChanged
from runtime.ledger.store import LedgerUnavailable
from runtime.pg.db import migrate, redact
from runtime.pg.ledger import default_instance

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    import psycopg

    from runtime.access.gate import Gate

log = logging.getLogger("flowc.access")

TICK = 0.25  # seconds between syncs: settlements, leases, key changes, liveness
LEASE_TTL = 10.0  # a lease not renewed for this long is taken back
LIVE = 3.0  # an instance not seen for this long no longer counts for rate-limit shares
CENT = Decimal("0.000000001")  # the store's precision (NUMERIC(18, 9), as the ledger)

MIGRATIONS: list[tuple[str, str]] = [
    ("access_0001_keys_budgets", """
        CREATE SEQUENCE keys_version;
        CREATE TABLE keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            hash TEXT NOT NULL UNIQUE,        -- SHA-256 of the secret; the secret is not kept
            hint TEXT,
            team TEXT,
            budget_usd NUMERIC(18, 9),
            period TEXT,
            rpm BIGINT,
            tpm BIGINT,
            models TEXT[],
            pipelines TEXT[],
            read_only BOOLEAN NOT NULL DEFAULT false,
            tags TEXT[],
            created_at TIMESTAMPTZ NOT NULL,
            expires_at TIMESTAMPTZ,
            revoked_at TIMESTAMPTZ,
            version BIGINT NOT NULL           -- from keys_version on every save: what to poll
        );
        CREATE INDEX keys_by_version ON keys (version);
        CREATE TABLE alerts (
            ts TIMESTAMPTZ NOT NULL DEFAULT now(),
            scope_kind TEXT NOT NULL,
            scope_name TEXT NOT NULL,
            threshold INTEGER NOT NULL,
            limit_usd NUMERIC(18, 9),
            spent_usd NUMERIC(18, 9),
            period TEXT,
            period_start TIMESTAMPTZ NOT NULL,
            -- one row (and one webhook) per threshold and period, whichever instance
            -- crossed it first
            PRIMARY KEY (scope_kind, scope_name, period_start, threshold)
        );
        -- One row per budget and period: settled spend, and what instances hold leased.
        CREATE TABLE budget_spend (
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            period_start TIMESTAMPTZ NOT NULL,
            spent NUMERIC(18, 9) NOT NULL DEFAULT 0,
            leased NUMERIC(18, 9) NOT NULL DEFAULT 0,
            last_grant NUMERIC(18, 9) NOT NULL DEFAULT 0,
            PRIMARY KEY (kind, name, period_start)
        );
        CREATE TABLE budget_leases (
            instance TEXT NOT NULL,
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            period_start TIMESTAMPTZ NOT NULL,
            amount NUMERIC(18, 9) NOT NULL,
            expires_at TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (instance, kind, name, period_start)
        );
        CREATE INDEX budget_leases_expiry ON budget_leases (expires_at);
        CREATE TABLE access_instances (
            id TEXT PRIMARY KEY,
            seen_at TIMESTAMPTZ NOT NULL
        );
    """),
]

_KEY_COLUMNS = ("id", "name", "hash", "hint", "team", "budget_usd", "period", "rpm", "tpm",
                "models", "pipelines", "read_only", "tags", "created_at", "expires_at",
                "revoked_at")
_SELECT_KEYS = f"SELECT {', '.join(_KEY_COLUMNS)}, version FROM keys"

# One statement, so atomic: grow this instance's lease on a budget by at least `need`
# and at most `want`, never past a share of the headroom left (`n`: see `_split`), and
# never so that all leases and spend together pass the limit.
_GRANT = """
WITH c AS (
    UPDATE budget_spend SET
        last_grant = LEAST(%(want)s, GREATEST(%(need)s,
                                              trunc((%(limit)s - spent - leased) / %(n)s, 9))),
        leased = leased + LEAST(%(want)s, GREATEST(%(need)s,
                                                   trunc((%(limit)s - spent - leased) / %(n)s, 9)))
    WHERE kind = %(kind)s AND name = %(name)s AND period_start = %(start)s
      AND spent + leased + %(need)s <= %(limit)s
    RETURNING kind, name, period_start, last_grant, spent, leased),
l AS (
    INSERT INTO budget_leases (instance, kind, name, period_start, amount, expires_at)
    SELECT %(me)s, kind, name, period_start, last_grant,
           now() + make_interval(secs => %(ttl)s) FROM c
    ON CONFLICT (instance, kind, name, period_start) DO UPDATE
        SET amount = budget_leases.amount + EXCLUDED.amount, expires_at = EXCLUDED.expires_at)
SELECT last_grant, spent, leased FROM c
"""
# What an instance charged (`d`, of which `dl` against its lease) is settled as spend and
# `back` (`dl` plus what it hands back) leaves its lease. A lease taken back meanwhile
# (this instance was cut off from the store for longer than LEASE_TTL) was already counted
# as spent: only what was charged beyond it is added.
_SETTLE = """
WITH l AS (
    UPDATE budget_leases SET amount = amount - %(back)s,
                             expires_at = now() + make_interval(secs => %(ttl)s)
    WHERE instance = %(me)s AND kind = %(kind)s AND name = %(name)s
      AND period_start = %(start)s
    RETURNING 1),
h AS (SELECT EXISTS (SELECT 1 FROM l) AS held)
INSERT INTO budget_spend AS b (kind, name, period_start, spent, leased)
SELECT %(kind)s, %(name)s, %(start)s,
       CASE WHEN held THEN %(d)s ELSE %(d)s - %(dl)s END, 0 FROM h
ON CONFLICT (kind, name, period_start) DO UPDATE SET
    spent = b.spent + EXCLUDED.spent,
    leased = b.leased - CASE WHEN (SELECT held FROM h) THEN %(back)s ELSE 0 END
RETURNING (SELECT held FROM h)
"""
# Leases whose instance stopped renewing them: the rest counts as spent.
_RECLAIM = """
WITH gone AS (DELETE FROM budget_leases WHERE expires_at < now()
              RETURNING kind, name, period_start, amount),
g AS (SELECT kind, name, period_start, sum(amount) AS amount FROM gone GROUP BY 1, 2, 3)
UPDATE budget_spend b SET leased = b.leased - g.amount, spent = b.spent + g.amount
FROM g WHERE b.kind = g.kind AND b.name = g.name AND b.period_start = g.period_start
"""
_GLOBALS = """
SELECT b.kind, b.name, b.period_start, b.spent, b.leased FROM budget_spend b
JOIN unnest(%s::text[], %s::text[], %s::timestamptz[]) AS u(kind, name, period_start)
  ON b.kind = u.kind AND b.name = u.name AND b.period_start = u.period_start
"""


class StoreUnavailable(LedgerUnavailable):
    """The shared store cannot be reached (the keys API answers 503 with this)."""


def _utc(t: datetime | None) -> datetime | None:
    return None if t is None else t.astimezone(UTC)


def _key(row: tuple[Any, ...]) -> Key:
    v = dict(zip(_KEY_COLUMNS, row, strict=False))
    return Key(id=v["id"], name=v["name"], hash=v["hash"], hint=v["hint"] or "",
               team=v["team"], budget_usd=v["budget_usd"], period=v["period"] or "month",
               rpm=v["rpm"], tpm=v["tpm"], models=tuple(v["models"] or ()),
               pipelines=tuple(v["pipelines"] or ()), read_only=bool(v["read_only"]),
               tags=tuple(v["tags"] or ()), created_at=_utc(v["created_at"]),  # type: ignore[arg-type]
               expires_at=_utc(v["expires_at"]), revoked_at=_utc(v["revoked_at"]))


class SharedCounter(Counter):
    """A budget's counter on one instance. ``lease``: what this instance holds of the
    budget in the store; ``pending``: charged here, not yet settled; ``settled`` and
    ``leased_all``: the store's totals as last read. Reservations (``reserved``) and
    pending charges stay within the lease (or are refused)."""

    __slots__ = ("demand", "lease", "leased_all", "leasing", "pending", "rate", "settled")

    def __init__(self, scope: Scope, limit: Decimal, period: Any, start: datetime,
                 end: float | None) -> None:
        super().__init__(scope, limit, period, start, end)
        self.lease = self.pending = self.settled = self.leased_all = ZERO
        self.demand = ZERO  # reserved since the last tick
        self.rate = ZERO  # reserved in the tick before: what the next may need
        self.leasing: asyncio.Future[bool] | None = None  # a lease asked for, not yet had

    def left(self) -> Decimal:
        """What this instance may still reserve: the headroom no instance holds, and what
        it holds itself and has not used."""
        return (self.limit - self.settled - self.leased_all
                + self.lease - self.pending - self.reserved)


class SharedBudgets(Budgets):
    """`Budgets` whose hard limits hold across instances (see the module's docstring)."""

    def __init__(self, access: PgAccessStore, thresholds: Iterable[int],
                 alert: Callable[[Alert], None] | None) -> None:
        super().__init__(lambda scope, since: ZERO, thresholds, alert)
        self.access = access
        self.retired: list[SharedCounter] = []  # a past period's, until settled

    def set(self, scope: Scope, limit: Decimal | None, period: Any,
            now: datetime | None = None) -> None:
        old = self.counters.get(scope)
        if limit is None:
            if old is not None:
                self._retire(old)  # type: ignore[arg-type]
                del self.counters[scope]
            return
        if old is not None and old.period == period:
            old.limit, old.alert_at = limit, ZERO
            return
        start = period_start(period, now or datetime.now(UTC))
        end = period_end(period, start)
        c = SharedCounter(scope, limit, period, start,
                          end.timestamp() if end is not None else None)
        if old is not None:
            c.reserved = old.reserved
            self._retire(old)  # type: ignore[arg-type]
        # The store's spend so far arrives with the next tick (within TICK seconds);
        # what may be spent never depends on it, only on the lease.
        self.counters[scope] = c

    def _retire(self, c: SharedCounter) -> None:
        old = SharedCounter(c.scope, c.limit, c.period, c.start, c.end)
        old.lease, old.pending = c.lease, c.pending
        c.lease = c.pending = ZERO
        if old.lease or old.pending:
            self.retired.append(old)

    def _roll(self, c: Counter, now: float) -> None:
        if c.end is not None and now >= c.end:
            self._retire(c)  # type: ignore[arg-type]
            super()._roll(c, now)
            c.settled = c.leased_all = ZERO  # type: ignore[attr-defined]

    def reserve_on(self, counters: list[Counter], amount: Decimal, now: float) -> None:
        access = self.access
        for c in counters:
            self._roll(c, now)
            assert isinstance(c, SharedCounter)
            if not access.online:
                if access.on_outage == "closed":
                    raise access.outage(c)
                continue  # open: counted here, settled when the store is back
            short = c.pending + c.reserved + amount - c.lease
            if short > 0:
                if short + c.settled > c.limit:
                    raise BudgetExceeded(c, amount)  # known already: no round trip
                own = c.leasing is None
                raise LeaseNeeded(c, amount, self._leasing(c, short, amount), own)
        for c in counters:
            c.reserved += amount
            c.demand += amount  # type: ignore[attr-defined]
            self._refill(c, amount)  # type: ignore[arg-type]

    def _leasing(self, c: SharedCounter, need: Decimal, amount: Decimal
                 ) -> asyncio.Future[bool]:
        """The lease being asked for on ``c``: calls short of headroom at once share one
        round trip (each admits again after it, and asks again if still short)."""
        if c.leasing is None:
            c.leasing = _background(self._lease(c, need, amount))
        return c.leasing

    async def _lease(self, c: SharedCounter, need: Decimal, amount: Decimal) -> bool:
        try:
            return await self.access.grant(c, need, amount)
        finally:
            c.leasing = None

    def _refill(self, c: SharedCounter, amount: Decimal) -> None:
        """Lease more in the background when what is held here would last less than half
        a tick at the recent demand, so calls rarely wait for a lease. Not near the end of
        the budget, where the tick hands back what is not in use for others to take."""
        if (c.leasing is None and c.rate and self.access.online
                and c.lease - c.pending - c.reserved < c.rate / 2
                and c.limit - c.settled - c.leased_all >= 4 * c.rate):
            c.leasing = _background(self._lease(c, CENT, amount))

    def charge(self, counters: list[Counter], cost: Decimal, held: Decimal = ZERO) -> None:
        for c in counters:
            c.pending += cost  # type: ignore[attr-defined]
        super().charge(counters, cost, held)

    # -- the tick, on the event loop around its work in the store ---------------------------
    def settlements(self, final: bool = False) -> list[Settlement]:
        """Take what to settle, hand back and lease ahead: ``(counter, charged, of it
        against the lease, handed back, to lease more)``; the counters already count what
        is settled and handed back as gone (see `restore`). ``final``: every lease back."""
        out = self._settlements()
        if final:
            for c in [*self.counters.values(), *self.retired]:
                assert isinstance(c, SharedCounter)
                if c.lease:
                    out.append((c, ZERO, ZERO, c.lease, ZERO))
                    c.lease = ZERO
        return out

    def _settlements(self) -> list[Settlement]:
        out = []
        live = {id(c) for c in self.counters.values()}
        for c in [*self.counters.values(), *self.retired]:
            assert isinstance(c, SharedCounter)
            d = c.pending
            dl = min(d, c.lease)
            spare = c.lease - dl - c.reserved
            free = c.limit - c.settled - c.leased_all
            # Hold about two ticks' worth of this instance's demand, leased here ahead of
            # the requests (so they rarely wait on the store), unless others may need the
            # rest more (the budget near its end): then hold only what is reserved.
            target = ZERO if id(c) not in live or free < 4 * c.demand else 2 * c.demand
            back = max(spare - target, ZERO)
            more = target - spare if spare < target / 2 else ZERO
            c.rate, c.demand = c.demand, ZERO
            if d or back or more:
                c.pending -= d
                c.lease -= dl + back
                out.append((c, d, dl, back, more))
        self.retired = [c for c in self.retired if c.lease or c.pending or c.reserved]
        return out

    def restore(self, taken: list[Settlement]) -> None:
        """The tick failed: what it took is pending again."""
        for c, d, dl, back, _ in taken:
            c.pending += d
            c.lease += dl + back
        known = {id(c) for c in [*self.counters.values(), *self.retired]}
        for c, *_ in taken:
            if id(c) not in known:
                known.add(id(c))
                self.retired.append(c)

    def refresh(self, totals: dict[tuple[str, str, datetime], tuple[Decimal, Decimal]],
                lost: set[int], granted: dict[int, Decimal]) -> None:
        """The store's totals as read by the tick; ``lost``: counters (ids) whose lease was
        taken back while this instance could not renew it; ``granted``: leased ahead."""
        for c in self.counters.values():
            assert isinstance(c, SharedCounter)
            if id(c) in lost:
                c.lease = ZERO
            c.lease += granted.get(id(c), ZERO)
            got = totals.get((c.scope.kind, c.scope.name, c.start))
            if got is not None:
                c.settled, c.leased_all = got
                c.spent = c.settled + c.pending
                self._crossed(c)  # others' spend may cross a threshold: one alert fires


def _background(lease: Any) -> asyncio.Future[bool]:
    """A lease as a task any number of calls may await, or none (a refill): an outage
    it ends with is then not reported as never retrieved."""
    task = asyncio.ensure_future(lease)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


def lease_size(c: SharedCounter, need: Decimal, amount: Decimal) -> tuple[Decimal, Decimal]:
    """How much of ``c``'s budget to ask for when ``need`` more is needed for a call that
    may cost ``amount``: at least ``need``, and up to eight such calls or a tick's demand
    more, so the next calls find it here (the lessor caps it at a share of what is left)."""
    need = need.quantize(CENT, ROUND_CEILING)
    return need, max(need, (need + max(8 * amount, c.rate)).quantize(CENT, ROUND_FLOOR))


# What one tick takes from a counter: (counter, charged, of it against the lease, handed
# back, to lease ahead).
Settlement = tuple[SharedCounter, Decimal, Decimal, Decimal, Decimal]


class Ticking:
    """A sync every `TICK` on the event loop (`tick`), and a last one at close that
    settles and hands back every lease (`tick(final=True)`)."""

    online: bool
    _task: asyncio.Task[None] | None = None
    _stopping = False

    async def tick(self, final: bool = False) -> None:
        raise NotImplementedError

    def _start_ticking(self) -> None:
        with contextlib.suppress(RuntimeError):  # no event loop: a CLI, no sync
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        # Never cancelled in the middle of a tick: what it took to settle would be lost
        # from the counters if its transaction then failed (see `_stop_ticking`).
        while not self._stopping:
            await asyncio.sleep(TICK)
            if self._stopping:
                return
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug: keep syncing, say so
                log.exception("syncing budgets (%s) failed", type(self).__name__)

    async def _stop_ticking(self) -> None:
        self._stopping = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        b: SharedBudgets | None = getattr(self, "budgets", None)
        if b is not None:  # leases still being granted are handed back too
            await asyncio.gather(*[c.leasing for c in b.counters.values()
                                   if isinstance(c, SharedCounter) and c.leasing],
                                 return_exceptions=True)
        if self.online:
            await self.tick(final=True)


class PgAccessStore(Ticking):
    """The shared store (an `AccessStore`, runtime/access/store.py) and this instance's
    sync with it. ``on_outage`` (closed | open): flowc.yaml's `budgets.on_store_outage`
    unless given. No I/O until first used: the schema is migrated then.

    ``instance`` is the instance's name, as on its ledger rows (`--instance`, else
    FLOWC_INSTANCE, else hostname:port). Its leases and its liveness row carry that name
    plus this process's pid and a random suffix (``self.instance``: "host:8080/4711-3fa2"):
    an instance killed and restarted under the same name within `LEASE_TTL` must not take
    its predecessor's leases for its own (it would renew them forever without knowing
    of them, and that headroom would be lost to the budget until its period ends); they
    expire and count as spent, as any killed instance's do."""

    def __init__(self, url: str, *, instance: str | None = None,
                 on_outage: str | None = None, lease_ttl: float = LEASE_TTL) -> None:
        self.url = url
        self.lease_ttl = lease_ttl
        self.on_outage = on_outage or "closed"
        self._outage_set = on_outage is not None
        self._migrated = False
        self.name = instance or default_instance()
        self.instance = f"{self.name}/{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.online = True
        self.error: str | None = None
        self.instances = 1
        self.rank = 0
        self.version = 0  # the highest key version seen
        self.budgets: SharedBudgets | None = None
        self._gate: Gate | None = None
        self._inline: psycopg.Connection | None = None  # leases, key saves, alerts
        self._bg: psycopg.Connection | None = None  # the tick's, in a worker thread
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # One user of a connection at a time: the tick's transaction on `_bg` must not
        # take in another thread's statement; a lost connection is replaced once.
        self._locks = {"_bg": threading.Lock(), "_inline": threading.Lock()}

    # -- connections ---------------------------------------------------------------------
    def _connect(self) -> psycopg.Connection:
        import psycopg

        # A request waits on the store only to lease more budget (off the event loop): never
        # for long, even when the network drops packets instead of refusing them.
        try:
            conn = psycopg.connect(self.url, autocommit=True, application_name="flowc",
                                   connect_timeout=2, tcp_user_timeout=3000)
            conn.execute("SET statement_timeout = 2000")
        except psycopg.Error as exc:
            raise StoreUnavailable(f"the shared store {redact(self.url)} is unreachable: "
                                   f"{str(exc).strip()}") from None
        return conn

    def _run(self, which: str, work: Callable[[psycopg.Connection], Any]) -> Any:
        """``work`` on one of the two connections (connecting if it was lost)."""
        with self._locks[which]:
            return self._run_locked(which, work)

    def _run_locked(self, which: str, work: Callable[[psycopg.Connection], Any]) -> Any:
        import psycopg

        for fresh in (False, True):
            conn = getattr(self, which)
            try:
                if conn is None or conn.closed:
                    if not fresh:
                        continue  # nothing to reuse: the second pass connects
                    conn = self._connect()
                    setattr(self, which, conn)
                if not self._migrated:
                    migrate(conn, MIGRATIONS)
                    self._migrated = True
                return work(conn)
            except psycopg.OperationalError as exc:
                with contextlib.suppress(Exception):
                    conn.close()
                setattr(self, which, None)
                if fresh:
                    raise StoreUnavailable(f"the shared store {redact(self.url)} is "
                                           f"unreachable: {str(exc).strip()}") from None
                # A connection lost while idle (the store restarted): one more try on a
                # new one.
        raise AssertionError("unreachable")

    # -- AccessStore ----------------------------------------------------------------------
    def load_keys(self) -> list[Key]:
        rows = self._run("_bg", lambda c: c.execute(_SELECT_KEYS + " ORDER BY version")
                         .fetchall())
        if rows:
            self.version = max(self.version, max(r[-1] for r in rows))
        return [_key(r) for r in rows]

    def save_key(self, key: Key, base: Key | None = None) -> None:
        """Instances change keys at once: with ``base``, the key's row is locked and
        compared with it before it is written (KeyChanged: another instance changed it
        since ``base`` was read), in one transaction."""
        cols = ", ".join(_KEY_COLUMNS)
        sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in _KEY_COLUMNS if c != "id")
        values = [key.id, key.name, key.hash, key.hint, key.team, key.budget_usd, key.period,
                  key.rpm, key.tpm, list(key.models), list(key.pipelines), key.read_only,
                  list(key.tags), key.created_at, key.expires_at, key.revoked_at]

        def write(c: psycopg.Connection) -> None:
            with c.transaction():
                if base is not None:
                    row = c.execute(_SELECT_KEYS + " WHERE id = %s FOR UPDATE",
                                    [key.id]).fetchone()
                    if row is None or _key(row) != base:
                        raise KeyChanged(f"key {key.id} was changed by another instance")
                c.execute(
                    f"INSERT INTO keys ({cols}, version) VALUES "
                    f"({', '.join('%s' for _ in _KEY_COLUMNS)}, nextval('keys_version')) "
                    f"ON CONFLICT (id) DO UPDATE SET {sets}, version = nextval('keys_version')",
                    values)

        self._run("_inline", write)

    def spend(self, scope: Scope, since: datetime) -> Decimal:
        """What ``scope`` has settled in the period starting at ``since``, plus what
        instances hold leased of it (the most that may have been spent)."""
        rows = self._run("_bg", lambda c: c.execute(
            "SELECT spent + leased FROM budget_spend WHERE kind = %s AND name = %s "
            "AND period_start = %s", [scope.kind, scope.name, since]).fetchall())
        return rows[0][0] if rows else ZERO

    def add_alert(self, alert: Alert) -> bool:
        """False: another instance already recorded (and sent) this alert."""
        rows = self._run("_inline", lambda c: c.execute(
            "INSERT INTO alerts (scope_kind, scope_name, threshold, limit_usd, spent_usd, "
            "period, period_start) VALUES (%s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING RETURNING 1",
            [alert.scope.kind, alert.scope.name, alert.threshold, alert.limit, alert.spent,
             alert.period, alert.period_start]).fetchall())
        return bool(rows)

    # -- budgets --------------------------------------------------------------------------
    def make_budgets(self, thresholds: Iterable[int],
                     alert: Callable[[Alert], None] | None) -> SharedBudgets:
        self.budgets = SharedBudgets(self, thresholds, alert)
        return self.budgets

    def outage(self, c: Counter) -> Denied:
        return Denied(503, "budget_store_unavailable", (
            f"The server is temporarily unable to check the budget of {c.scope}: flowc's "
            "shared store is unreachable, and budgets fail closed (budgets.on_store_outage "
            "in flowc.yaml). Please retry your request after a brief wait."))

    def _split(self) -> int:
        """Into how many parts a lease divides the headroom left at most: twice the live
        instances, so half of it stays free for whichever instance needs it next (an
        instance may not know of the others yet, or hold a slice it is not using)."""
        return 2 * max(self.instances, 1)

    async def grant(self, c: SharedCounter, need: Decimal, amount: Decimal) -> bool:
        """Lease at least ``need`` more of ``c``'s budget (one round trip, on a thread: the
        event loop serves other requests meanwhile); False when the budget has not that
        much left. While the store is unreachable, fails closed or open."""
        need, want = lease_size(c, need, amount)
        if need + c.settled > c.limit:
            return False  # known already: no round trip
        args = {"want": want, "need": need, "limit": c.limit, "n": self._split(),
                "kind": c.scope.kind, "name": c.scope.name, "start": c.start,
                "me": self.instance, "ttl": self.lease_ttl}

        where = [c.scope.kind, c.scope.name, c.start]

        def work(conn: psycopg.Connection) -> Any:
            row = conn.execute(_GRANT, args).fetchone()
            if row is None:  # no row yet for this budget and period, or not enough left
                conn.execute("INSERT INTO budget_spend (kind, name, period_start) VALUES "
                             "(%s, %s, %s) ON CONFLICT DO NOTHING", where)
                row = conn.execute(_GRANT, args).fetchone()
            if row is None:  # refused: the totals, for a message that says what is left
                totals = conn.execute("SELECT spent, leased FROM budget_spend WHERE kind = "
                                      "%s AND name = %s AND period_start = %s",
                                      where).fetchone()
                return None, totals
            return row, None

        try:
            row, totals = await asyncio.to_thread(self._run, "_inline", work)
        except StoreUnavailable as exc:
            self._down(str(exc))
            if self.on_outage == "closed":
                raise self.outage(c) from None
            return True
        if row is None:
            if totals is not None:
                c.settled, c.leased_all = totals
            return False
        granted, c.settled, c.leased_all = row
        c.lease += granted
        return True

    # -- the tick -------------------------------------------------------------------------
    def attach(self, gate: Gate) -> None:
        """The gate this store feeds; inside a running server, its sync starts now."""
        self._gate = gate
        if not self._outage_set:
            self.on_outage = gate.config.budgets.on_store_outage
        self._start_ticking()

    async def tick(self, final: bool = False) -> None:
        """One sync: settle and hand back, renew leases, take back expired ones, read
        the totals, key changes and live instances. ``final``: hand back every lease."""
        b = self.budgets
        gate = self._gate
        taken = b.settlements(final) if b is not None else []
        watched = list(b.counters.values()) if b is not None else []
        try:
            out = await asyncio.to_thread(self._run, "_bg", lambda conn: self._sync(
                conn, taken, watched, final))
        except StoreUnavailable as exc:
            if b is not None:
                b.restore(taken)
            self._down(str(exc))
            return
        if not self.online:
            log.warning("the shared store is reachable again: budgets are checked again")
        self.online, self.error = True, None
        totals, lost, granted, keys, live = out
        if final:  # shutting down: nothing more to apply (an alert now would not be sent)
            return
        if b is not None:
            b.refresh(totals, lost, granted)
        if gate is not None:
            for key in keys:
                gate.put(key)
            rank = live.index(self.instance) if self.instance in live else 0
            if (rank, len(live)) != (self.rank, self.instances):
                self.rank, self.instances = rank, max(len(live), 1)
                gate.set_share(self.rank, self.instances)

    def _sync(self, conn: psycopg.Connection, taken: list[Settlement],
              watched: list[SharedCounter], final: bool
              ) -> tuple[dict[Any, Any], set[int], dict[int, Decimal], list[Key], list[str]]:
        lost: set[int] = set()
        granted: dict[int, Decimal] = {}
        with conn.transaction():
            for c, d, dl, back, more in taken:
                where = {"me": self.instance, "kind": c.scope.kind, "name": c.scope.name,
                         "start": c.start, "ttl": self.lease_ttl}
                if d or back:
                    held = conn.execute(_SETTLE, {"back": dl + back, "d": d, "dl": dl,
                                                  **where}).fetchone()
                    if held is not None and not held[0]:
                        lost.add(id(c))
                if more and not final:
                    row = conn.execute(_GRANT, {
                        "want": more.quantize(CENT, ROUND_FLOOR), "need": CENT,
                        "limit": c.limit, "n": self._split(), **where}).fetchone()
                    if row is not None:
                        granted[id(c)] = row[0]
            conn.execute("DELETE FROM budget_leases WHERE instance = %s AND amount <= 0",
                         [self.instance])
            conn.execute("UPDATE budget_leases SET expires_at = now() + "
                         "make_interval(secs => %s) WHERE instance = %s",
                         [self.lease_ttl, self.instance])
            conn.execute(_RECLAIM)
            totals: dict[Any, Any] = {}
            if watched:
                rows = conn.execute(_GLOBALS, [[c.scope.kind for c in watched],
                                               [c.scope.name for c in watched],
                                               [c.start for c in watched]]).fetchall()
                totals = {(k, n, _utc(s)): (sp, le) for k, n, s, sp, le in rows}
            keys = conn.execute(_SELECT_KEYS + " WHERE version > %s ORDER BY version",
                                [self.version]).fetchall()
            if final:
                conn.execute("DELETE FROM access_instances WHERE id = %s", [self.instance])
                live: list[str] = []
            else:
                conn.execute("INSERT INTO access_instances (id, seen_at) VALUES (%s, now()) "
                             "ON CONFLICT (id) DO UPDATE SET seen_at = now()",
                             [self.instance])
                live = [r[0] for r in conn.execute(
                    "SELECT id FROM access_instances WHERE seen_at > now() - "
                    "make_interval(secs => %s) ORDER BY id", [LIVE])]
        if keys:
            self.version = max(r[-1] for r in keys)
        return totals, lost, granted, [_key(r) for r in keys], live

    def _down(self, error: str) -> None:
        if self.online:
            log.warning("%s; budgets fail %s until it is back", error, self.on_outage)
        self.online, self.error = False, error

    def status(self) -> dict[str, Any]:
        """For /ready."""
        return {"url": redact(self.url), "reachable": self.online, "instance": self.name,
                "process": self.instance,
                "instances": self.instances, "budgets_on_outage": self.on_outage,
                **({"error": self.error} if self.error else {})}

    def read_totals(self) -> None:
        """Every budget's settled and leased spend, as a tick reads them, for a command that
        shows them without syncing (`flowc keys list --store`)."""
        if self.budgets is None:
            return
        counters = list(self.budgets.counters.values())
        rows = self._run("_bg", lambda c: c.execute(_GLOBALS, [
            [k.scope.kind for k in counters], [k.scope.name for k in counters],
            [k.start for k in counters]]).fetchall())
        self.budgets.refresh({(r[0], r[1], r[2]): (r[3], r[4]) for r in rows}, set(), {})

    def close_connections(self) -> None:
        """For a command, which holds no lease and never joined the live instances."""
        for conn in (self._inline, self._bg):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    async def aclose(self) -> None:
        """Settle, hand every lease back, leave the live instances."""
        await self._stop_ticking()
        for conn in (self._inline, self._bg):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

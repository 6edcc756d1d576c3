"""The cost ledger on a shared Postgres: what `flowc serve --store postgresql://...` records
into, with the interface the server uses of the embedded `Ledger` (record, record_run,
select, report, execute, flush, close, owner, status).

The request path only formats a row and writes it to the local spool (runtime/pg/spool.py):
no connection, no transaction, nothing shared with other instances. One writer thread
closes a spool segment once per flush interval (or at `_BATCH` rows) and sends the closed
segments in one transaction: COPY into a temporary staging table, then
`INSERT ... SELECT ... ON CONFLICT DO NOTHING` into the day-partitioned `requests` table.
Rows carry ids made here (this process's prefix and a counter), so a batch sent twice (the
connection dropped after the commit, the process killed before deleting the segment) is
stored once. While Postgres is unreachable the segments wait on disk and `/ready` says so;
they go, oldest first, as soon as it answers again.

There is no hot row: instances never update a shared counter; budgets sum the rows (see
runtime/pg/access.py). Retention (`ledger.retention`) drops whole day partitions."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import operator
import re
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import orjson

from runtime.ledger.store import (
    CallRecord,
    LedgerUnavailable,
    QueryTimeout,
    SQLRefused,
    default_sql_timeout,
)
from runtime.pg import db
from runtime.pg.schema import MIGRATIONS, SPOOL_FIELDS, partition_name
from runtime.pg.spool import Spool, read

log = logging.getLogger("flowc.ledger")
_BATCH = 20_000  # rows in the open segment that wake the writer before its interval
_SEND_MAX = 16 << 20  # bytes of segments sent in one transaction (~50k rows), at most
_RETRY_MAX = 10.0  # seconds between attempts to reach Postgres, at most
_CONNECT_TIMEOUT = 3  # seconds
_RETENTION_EVERY = 3600.0  # seconds between retention passes
_SPOOL_LIMIT = 1 << 30  # bytes of spooled rows past which /ready says not ready
_INT_MAX = 2**62 - 1  # two counts this size still sum (total_tokens) within BIGINT
_COST_MAX = Decimal("999999999.999999999")
_TS_MAX = 253_402_300_799.0  # 9999-12-31 23:59:59
_fields = operator.attrgetter(*SPOOL_FIELDS)
# JSON array index of each spooled field (the id is 0; a fixed row has `clamped` at the end)
_AT = {name: i + 1 for i, name in enumerate(SPOOL_FIELDS)}
_CLAMPED = len(SPOOL_FIELDS) + 1


def default_instance(port: int | None = None) -> str:
    """hostname:port: names the rows this instance served, and its spool."""
    return f"{socket.gethostname()}:{port}" if port else socket.gethostname()


class _Unfit(TypeError):
    """A value the fast encoding does not take as is: the row is fixed (`_fixed`)."""


def _cost_text(v: Any) -> str:
    """orjson's `default`: the cost as exact text (DECIMAL(18, 9) at most)."""
    if type(v) is Decimal and v.is_finite() and -_COST_MAX <= v <= _COST_MAX:
        return str(v)
    raise _Unfit(v)


_dumps = functools.partial(orjson.dumps, default=_cost_text,
                           option=orjson.OPT_APPEND_NEWLINE)


def line(c: CallRecord, row_id: str) -> bytes:
    """One row as a JSON array (the id, then `SPOOL_FIELDS`), one line: orjson does it in
    C (~1 us) where formatting each field for COPY's text format cost ~15 us in Python. A
    row orjson refuses (a count past 64 bits, text that is not UTF-8, a cost out of range)
    is fixed and marked `clamped`."""
    fields = _fields(c)
    try:
        if type(c.ts) is float and 0.0 <= c.ts <= _TS_MAX:
            out = _dumps((row_id, *fields))
            if b"\\u0000" not in out:  # Postgres text cannot hold NUL
                return out
    except (_Unfit, TypeError, OverflowError, orjson.JSONEncodeError):
        pass
    fixed = _fixed(fields)
    return _dumps((row_id, *fixed, fixed != list(fields)))


def _fixed(fields: tuple[Any, ...]) -> list[Any]:
    out = list(fields)
    for name, i in _AT.items():
        v, i = out[i - 1], i - 1
        if name in _COSTS:
            if not (type(v) is Decimal and v.is_finite() and -_COST_MAX <= v <= _COST_MAX):
                out[i] = _fix_cost(v)
        elif name in _INTS:
            out[i] = _fix_int(v)
        elif name in ("ts", "latency_ms", "ttft_ms"):
            out[i] = _fix_float(v, name == "ttft_ms")
        elif name in _BOOLS:
            out[i] = bool(v)
        elif v is not None:
            out[i] = (v if isinstance(v, str) else str(v)).encode(
                "utf-8", "replace").decode("utf-8").replace("\0", "")
    if out[0] is None:
        out[0] = time.time()
    out[0] = min(max(out[0], 0.0), _TS_MAX)
    return out


_INTS = {"prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens",
         "reasoning_tokens", "cache_write_1h_tokens"}
_BOOLS = {"success", "stream", "dry_run", "usage_estimated", "cached"}
_COSTS = {"cost_usd", "saved_usd"}


def _fix_int(v: Any) -> int:
    if type(v) is int and -_INT_MAX <= v <= _INT_MAX:
        return v
    try:
        return max(-_INT_MAX, min(_INT_MAX, int(v)))
    except (TypeError, ValueError, OverflowError):
        return 0


def _fix_float(v: Any, nullable: bool) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return f if f == f and abs(f) != float("inf") else None


def _fix_cost(v: Any) -> str | None:
    """Unknown (NULL, never $0) when it is not a number; clamped into DECIMAL(18, 9)."""
    if v is None:
        return None
    try:
        d = Decimal(v) if isinstance(v, str | int | Decimal) else Decimal(repr(float(v)))
        if not d.is_finite():
            return None
        d = d.quantize(Decimal("1e-9"))
    except (InvalidOperation, TypeError, ValueError):
        return None
    return format(_COST_MAX.copy_sign(d) if abs(d) > _COST_MAX else d, "f")


def _column(name: str) -> str:
    """How the INSERT reads a spooled field from the row's JSON array ``r``."""
    at = f"r->>{_AT[name]}"
    if name == "ts":
        return f"to_timestamp(({at})::float8) AT TIME ZONE 'UTC'"
    if name in _COSTS:
        return f"({at})::numeric(18, 9)"
    if name in _INTS:
        return f"({at})::bigint"
    if name in ("latency_ms", "ttft_ms"):
        return f"({at})::float8"
    if name in _BOOLS:
        return f"({at})::boolean"
    if name == "status":
        return f"coalesce({at}, CASE WHEN (r->>{_AT['success']})::boolean THEN 'ok' " \
               "ELSE 'error' END)"
    return at


_STAGE = "CREATE TEMP TABLE IF NOT EXISTS flowc_stage (r jsonb) ON COMMIT DELETE ROWS"
# The spool's lines are JSON: read each whole (CSV with a delimiter and quote JSON never
# holds unescaped), not as COPY's text format, whose backslash escapes would unescape JSON's.
_COPY = "COPY flowc_stage (r) FROM STDIN (FORMAT csv, DELIMITER E'\\x01', QUOTE E'\\x02')"
_INSERT = (
    f"INSERT INTO requests (id, {', '.join(SPOOL_FIELDS)}, total_tokens, clamped, instance) "
    f"SELECT r->>0, {', '.join(_column(n) for n in SPOOL_FIELDS)}, "
    f"({_column('prompt_tokens')}) + ({_column('completion_tokens')}), "
    f"coalesce((r->>{_CLAMPED})::boolean, false), %s FROM flowc_stage "
    "ON CONFLICT DO NOTHING")
_INSERT_NEW = _INSERT.removesuffix(" ON CONFLICT DO NOTHING")
_DAYS = ("SELECT DISTINCT to_char(to_timestamp((r->>1)::float8) AT TIME ZONE 'UTC', "
         "'YYYY-MM-DD') FROM flowc_stage")


def placeholders(sql: str) -> str:
    """flowc's own statements are written with `?` (DuckDB's style): as psycopg's `%s`.
    (They hold no `?` or `%` inside string literals.)"""
    return sql.replace("%", "%%").replace("?", "%s")


_RETENTION = re.compile(r"^\s*(\d+)\s*(d|days?|w|weeks?|m|months?|y|years?)\s*$", re.I)


def retention_days(value: str | int | None) -> int | None:
    """`ledger.retention` ("90d", "12w", "6m", "1y", or days as a number) in days."""
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        n, unit = value, "d"
    else:
        m = _RETENTION.match(str(value))
        if not m:
            raise ValueError(f"ledger.retention must be a duration like 90d, 12w, 6m or 1y, "
                             f"not {value!r}")
        n, unit = int(m.group(1)), m.group(2).lower()[0]
    if n <= 0:
        raise ValueError(f"ledger.retention must be at least one day, not {value!r}")
    return n * {"d": 1, "w": 7, "m": 31, "y": 366}[unit]


class PgLedger:
    """The shared ledger: see the module docstring. ``spool`` is this instance's folder
    (under the project's .flowc/); ``instance`` names its rows."""

    def __init__(self, url: str, spool: Path, instance: str, flush_interval: float = 1.0, *,
                 retention: str | int | None = None, sql_timeout: float | None = None,
                 spool_limit: int = _SPOOL_LIMIT) -> None:
        self.url = url
        self.instance = instance
        self.flush_interval = flush_interval
        self.sql_timeout = sql_timeout if sql_timeout is not None else default_sql_timeout()
        self.retention = retention_days(retention)
        self.spool_limit = spool_limit
        self.spool = Spool(spool)
        # Segments whose sending began (or that a previous process left): maybe in Postgres.
        self._tried: set[str] = {p.name for p in self.spool.segments()}
        self._prefix = uuid.uuid4().hex[:16] + "-"
        self._ids = itertools.count(1)
        self._conn: Any = None  # the writer's connection
        self._conn2: Any = None  # and a second, for a backlog
        self._days: set[str] = set()  # partitions known to exist
        self.connected = False
        self.error: str | None = None
        self._next_try = 0.0
        self._backoff = 0.5
        self._next_retention = 0.0
        self._wake = threading.Event()
        self._flushed = threading.Condition()
        self._started = self._generation = 0
        self._closing = self._closed = False
        self.sent = 0  # rows committed by this process
        self._pool = self._open_pool()
        with contextlib.closing(db.connect(url)) as conn:  # fails start-up clearly
            migrate(conn)
        self.connected = True
        self._thread = threading.Thread(target=self._run, name="flowc-ledger-pg", daemon=True)
        self._thread.start()

    def _open_pool(self) -> Any:
        from psycopg_pool import ConnectionPool

        return ConnectionPool(self.url, min_size=1, max_size=4, timeout=_CONNECT_TIMEOUT + 2,
                              kwargs={"autocommit": True, "application_name": "flowc",
                                      "connect_timeout": _CONNECT_TIMEOUT},
                              configure=_configure, open=True, name="flowc-ledger")

    # -- recording ---------------------------------------------------------------------------
    def record(self, call: CallRecord) -> None:
        """Write one row to the spool (a `write(2)` of one line; never blocks on the
        database)."""
        self.spool.append(line(call, f"{self._prefix}{next(self._ids):x}"))
        if self.spool.open_rows >= _BATCH:
            self._wake.set()

    def record_run(self, row: dict[str, Any]) -> None:
        """A run record, after its calls (this waits for one writer pass): stored at once,
        or spooled (a JSON file) while Postgres is unreachable."""
        self.flush()
        try:
            with self._pool.connection() as conn:
                _insert_run(conn, row, self.instance)
            return
        except Exception as exc:
            log.warning("ledger: run %s spooled (%s)", row.get("id"), _reason(exc))
        tmp = self.spool.folder / f".run-{row['id']}.tmp"
        tmp.write_text(json.dumps(row, default=str))
        tmp.rename(self.spool.folder / f"run-{row['id']}.json")
        self._wake.set()

    def flush(self) -> None:
        """Block until the rows recorded so far were sent (or found Postgres unreachable:
        they wait in the spool)."""
        with self._flushed:
            target = self._started + 1
            self._wake.set()
            self._flushed.wait_for(lambda: self._generation >= target or self._closed,
                                   timeout=60)

    def close(self) -> None:
        """Send what is spooled (one attempt), then stop; what could not be sent stays in
        the spool for the next start."""
        if self._closed:
            return
        self._closing = True
        self._wake.set()
        self._thread.join()
        self._closed = True
        self.spool.close()
        with contextlib.suppress(Exception):
            self._pool.close()
        for conn in (self._conn, self._conn2):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    # -- what /ready shows -------------------------------------------------------------------
    @property
    def owner(self) -> bool:
        """Whether reads can be answered and rows are reaching the database."""
        return self.connected

    def status(self) -> dict[str, Any]:
        full = self.spool.bytes >= self.spool_limit
        return {"owner": self.connected and not full, "store": "postgres",
                "url": db.redact(self.url), "instance": self.instance,
                "connected": self.connected, "spooled_rows": self.spool.rows,
                "spool_bytes": self.spool.bytes, "spool_full": full,
                "spool": str(self.spool.folder), **({"error": self.error} if self.error
                                                     else {})}

    # -- reading -----------------------------------------------------------------------------
    def select(self, sql: str, params: Sequence[Any] = (), *, timeout: float | None = -1.0
               ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """User SQL (PostgreSQL's dialect, `$1` parameters): one SELECT, in a READ ONLY
        transaction (as the flowc_reader role when there is one), stopped after
        ``sql_timeout`` seconds, always rolled back. ``timeout=None``: flowc's own
        reports (`report`)."""
        limit = self.sql_timeout if timeout is not None and timeout < 0 else timeout
        try:
            with self._pool.connection() as conn:
                return run_select(conn, sql, params, limit)
        except (SQLRefused, QueryTimeout):
            raise
        except _unreachable() as exc:
            raise LedgerUnavailable(f"the shared store {db.redact(self.url)} is "
                                    f"unreachable: {_reason(exc)}") from None

    def report(self, sql: str, params: Sequence[Any] = ()
               ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """flowc's own reports (runtime/ledger/reports.py, written for DuckDB): run
        translated (runtime/pg/reports.py), without a time limit."""
        from runtime.pg.reports import to_postgres

        try:
            with self._pool.connection() as conn:
                cur = conn.execute(to_postgres(sql), list(params))
                return [d.name for d in cur.description or ()], cur.fetchall()
        except _unreachable() as exc:
            raise LedgerUnavailable(f"the shared store {db.redact(self.url)} is "
                                    f"unreachable: {_reason(exc)}") from None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """flowc's own statements (runs, pipelines), written with `?` parameters."""
        try:
            with self._pool.connection() as conn:
                cur = conn.execute(placeholders(sql), list(params))
                return cur.fetchall() if cur.description else []
        except _unreachable() as exc:
            raise LedgerUnavailable(f"the shared store {db.redact(self.url)} is "
                                    f"unreachable: {_reason(exc)}") from None

    # -- the writer thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            stopping = self._closing
            with self._flushed:
                self._started += 1
            self.spool.seal()
            if time.monotonic() >= self._next_try or stopping:
                try:
                    self._send()
                    self._send_runs(self._connection())
                    self._sent()
                except Exception as exc:
                    self._lost(exc)
            with self._flushed:
                self._generation += 1
                self._flushed.notify_all()
            if stopping:
                return

    def _connection(self, second: bool = False) -> Any:
        """The writer's connection (``second``: the one a backlog is also sent on)."""
        conn = self._conn2 if second else self._conn
        if conn is None or conn.closed:
            import psycopg

            conn = psycopg.connect(self.url, autocommit=True, application_name="flowc",
                                   connect_timeout=_CONNECT_TIMEOUT)
            _configure(conn)
            conn.execute(_STAGE)
            if second:
                self._conn2 = conn
            else:
                self._conn = conn
                self._days.clear()
                self._next_retention = 0.0  # the upkeep runs on this connection's first pass
        return conn

    def _send(self) -> None:
        conn = self._connection()
        if time.monotonic() >= self._next_retention:  # hourly upkeep
            self._next_retention = time.monotonic() + _RETENTION_EVERY
            # Partitions a day ahead: making one locks `requests` for a moment, better
            # not while rows wait for it.
            today = datetime.now(UTC).date()
            self.ensure_partitions(conn, [d for d in (str(today),
                                                      str(today + timedelta(days=1)))
                                          if d not in self._days])
            self.drop_old(conn)
        batches: list[list[Path]] = []
        size = _SEND_MAX
        for p in self.spool.segments():
            if size >= _SEND_MAX:
                batches.append([])
                size = 0
            batches[-1].append(p)
            size += p.stat().st_size
        # A backlog (after an outage, a burst) goes two batches at a time on two
        # connections: Postgres parses and inserts each on its own core.
        for i in range(0, len(batches), 2):
            pair = batches[i:i + 2]
            if len(pair) == 1:
                self.sent += self._send_batch(conn, pair[0])
                continue
            second = self._connection(second=True)
            with ThreadPoolExecutor(1) as pool:
                other = pool.submit(self._send_batch, second, pair[1])
                sent = self._send_batch(conn, pair[0])
                self.sent += sent + other.result()

    def _send_batch(self, conn: Any, batch: list[Path]) -> int:
        """Send closed segments in one transaction, then delete them; the rows sent."""
        import psycopg

        datas = [read(p) for p in batch]
        # A segment never tried before cannot be in Postgres yet: a plain INSERT (~1.5x
        # the rows/s of ON CONFLICT's checks). One tried before (its commit may have
        # happened) or left by a previous process is deduplicated.
        fresh = not any(p.name in self._tried for p in batch)
        self._tried.update(p.name for p in batch)
        try:
            try:
                rows = self._insert(conn, datas, dedupe=not fresh)
            except psycopg.errors.UniqueViolation:  # it was there after all
                rows = self._insert(conn, datas, dedupe=True)
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:  # a row Postgres refuses must not block the rest
            log.error("ledger: a batch was refused (%s); sending its rows one by one",
                      _reason(exc))
            rows = self._insert_each(conn, datas)
        self.spool.done(batch, rows)
        self._tried.difference_update(p.name for p in batch)
        return rows

    def _send_runs(self, conn: Any) -> None:
        for run_file in sorted(self.spool.folder.glob("run-*.json")):
            _insert_run(conn, json.loads(run_file.read_text()), self.instance)
            run_file.unlink()

    def _sent(self) -> None:
        """A pass reached Postgres: say so if it had not."""
        if not self.connected:
            if self.error:
                log.warning("ledger: the shared store is reachable again; spooled rows sent")
            self.connected, self.error, self._backoff = True, None, 0.5

    def _insert(self, conn: Any, datas: list[tuple[bytes, int]], dedupe: bool = True
                ) -> int:
        """Send spooled lines in one transaction (making the day partitions they need
        first); returns how many."""
        try:
            return self._copy(conn, datas, dedupe)
        except _NeedPartitions as need:
            self.ensure_partitions(conn, need.days)
            return self._copy(conn, datas, dedupe)

    def _insert_each(self, conn: Any, datas: list[tuple[bytes, int]]) -> int:
        """Lines one by one; those Postgres refuses go to `rejected.jsonl` in the spool
        (kept, logged), so one bad row never holds up the rows behind it."""
        import psycopg

        rows = 0
        for data, _ in datas:
            for one in data.splitlines(keepends=True):
                try:
                    self._insert(conn, [(one, 1)])
                    rows += 1
                except psycopg.OperationalError:
                    raise
                except psycopg.Error as exc:
                    log.error("ledger: row refused by Postgres, kept in %s: %s",
                              self.spool.folder / "rejected.jsonl", _reason(exc))
                    with open(self.spool.folder / "rejected.jsonl", "ab") as f:
                        f.write(one)
                    rows += 1
        return rows

    def _copy(self, conn: Any, datas: list[tuple[bytes, int]], dedupe: bool) -> int:
        """Send spooled lines in one transaction; returns how many."""
        rows = sum(n for _, n in datas)
        if not rows:
            return 0
        with conn.transaction():
            with conn.cursor().copy(_COPY) as copy:
                for data, _ in datas:
                    copy.write(data)
            days = [r[0] for r in conn.execute(_DAYS)]
            missing = [d for d in days if d not in self._days]
            if missing:
                # A partition is made in a transaction of its own (it locks `requests`
                # briefly): this one is given up and sent again after.
                raise _NeedPartitions(missing)
            conn.execute(_INSERT if dedupe else _INSERT_NEW, [self.instance])
        return rows

    def ensure_partitions(self, conn: Any, days: Sequence[str]) -> None:
        """Day partitions of `requests` for ``days`` (YYYY-MM-DD), made if missing; under an
        advisory lock so instances making the same one take turns."""
        for day in days:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [db.MIGRATION_LOCK + 1])
                name = partition_name(day)
                start = datetime.fromisoformat(day)  # checked: a date, nothing else
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF requests FOR VALUES "
                    f"FROM ('{start:%Y-%m-%d}') TO (DATE '{start:%Y-%m-%d}' + 1)")
            self._days.add(day)

    def drop_old(self, conn: Any, now: datetime | None = None) -> list[str]:
        """Drop the day partitions wholly older than the retention period; their names."""
        if self.retention is None:
            return []
        cutoff = ((now or datetime.now(UTC)) - timedelta(days=self.retention)).date()
        dropped = []
        for (name,) in conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'requests'::regclass ORDER BY 1").fetchall():
            m = re.fullmatch(r"requests_(\d{8})", name)
            if not m or datetime.strptime(m.group(1), "%Y%m%d").date() >= cutoff:
                continue
            with conn.transaction():
                conn.execute(f"DROP TABLE IF EXISTS {name}")
            self._days.discard(f"{name[9:13]}-{name[13:15]}-{name[15:17]}")
            dropped.append(name)
        if dropped:
            log.info("ledger: retention (%d days) dropped %s", self.retention,
                     ", ".join(dropped))
        # Step cache entries are kept no longer than the calls they saved (cutoff: UTC).
        conn.execute("DELETE FROM step_cache WHERE created_at < %s",
                     [datetime.combine(cutoff, datetime.min.time())])
        return dropped

    def _lost(self, exc: Exception) -> None:
        for name in ("_conn", "_conn2"):
            conn = getattr(self, name)
            if conn is not None and (conn.closed or conn.broken):
                setattr(self, name, None)
        reason = _reason(exc)
        if self.connected or self.error != reason:
            log.warning("ledger: cannot reach the shared store %s (%s): rows wait in the "
                        "spool %s (%d rows) and are sent when it is back",
                        db.redact(self.url), reason, self.spool.folder, self.spool.rows)
        if not isinstance(exc, _unreachable()):
            log.exception("ledger: sending spooled rows failed", exc_info=exc)
        self.connected, self.error = False, reason
        self._next_try = time.monotonic() + self._backoff
        self._backoff = min(_RETRY_MAX, self._backoff * 2)


class _NeedPartitions(Exception):
    def __init__(self, days: list[str]) -> None:
        super().__init__(f"partitions needed for {days}")
        self.days = days


def _unreachable() -> tuple[type[Exception], ...]:
    import psycopg
    from psycopg_pool import PoolTimeout

    return (psycopg.OperationalError, PoolTimeout)


def _reason(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _configure(conn: Any) -> None:
    """Run records come back as their JSON text (as the embedded ledger returns them)."""
    from psycopg.types.string import TextLoader

    conn.adapters.register_loader("jsonb", TextLoader)
    conn.adapters.register_loader("json", TextLoader)


def migrate(conn: Any) -> list[str]:
    """The ledger's tables, and a read-only role for user SQL where flowc may make one."""
    applied = db.migrate(conn, MIGRATIONS)
    with contextlib.suppress(Exception):
        conn.execute(_READER)
    return applied


# User SQL runs as `flowc_reader` when flowc could make that role: it may read the ledger's
# tables and nothing else (not keys, not server files). Best effort: a database user without
# CREATEROLE still gets the READ ONLY transaction and the SELECT-only check.
_READER = """
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'flowc_reader') THEN
    CREATE ROLE flowc_reader NOLOGIN;
  END IF;
  GRANT USAGE ON SCHEMA public TO flowc_reader;
  GRANT SELECT ON requests, runs, workflows TO flowc_reader;
  IF NOT pg_has_role(current_user, 'flowc_reader', 'MEMBER') THEN
    EXECUTE format('GRANT flowc_reader TO %I', current_user);
  END IF;
END $$"""
_SELECT = re.compile(r"^\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*)*\(*\s*(select|with|values|table)\b",
                     re.I | re.S)


def run_select(conn: Any, sql: str, params: Sequence[Any], timeout: float | None
               ) -> tuple[list[str], list[tuple[Any, ...]]]:
    """One user query (see `PgLedger.select`)."""
    import psycopg

    if not _SELECT.match(sql):
        raise SQLRefused("only SELECT queries are allowed (PostgreSQL's dialect; see "
                         "docs/scaling.md)")
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION READ ONLY")
            if timeout is not None:
                conn.execute(f"SET LOCAL statement_timeout = {max(1, int(timeout * 1000))}")
            if conn.execute("SELECT pg_has_role(current_user, oid, 'MEMBER') FROM pg_roles "
                            "WHERE rolname = 'flowc_reader'").fetchone() == (True,):
                conn.execute("SET LOCAL ROLE flowc_reader")
            cur = psycopg.RawCursor(conn)
            # prepare=True: the extended protocol, so exactly one statement runs
            cur.execute(sql, list(params) or None, prepare=True)
            columns = [d.name for d in cur.description or ()]
            rows = cur.fetchall() if cur.description else []
            raise _Rollback((columns, rows))
    except _Rollback as done:
        return done.result
    except psycopg.errors.QueryCanceled:
        raise QueryTimeout(f"the query ran past the {timeout:g} s limit and was stopped "
                           "(FLOWC_SQL_TIMEOUT sets the limit)") from None
    except psycopg.errors.ReadOnlySqlTransaction:
        raise SQLRefused("queries are read-only: this one writes") from None
    except psycopg.errors.SyntaxError as exc:
        if "multiple commands" in str(exc):
            raise SQLRefused("give exactly one SELECT statement") from None
        raise


class _Rollback(Exception):
    def __init__(self, result: tuple[list[str], list[tuple[Any, ...]]]) -> None:
        super().__init__("rolled back")
        self.result = result


def _insert_run(conn: Any, row: dict[str, Any], instance: str) -> None:
    conn.execute(
        "INSERT INTO runs (id, workflow_name, inputs_hash, status, started_at, finished_at, "
        "latency_ms, dry_run, record, key_id, team, instance) VALUES "
        "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET "
        "status = excluded.status, finished_at = excluded.finished_at, "
        "latency_ms = excluded.latency_ms, record = excluded.record",
        [row["id"], row["workflow_name"], row.get("inputs_hash"), row["status"],
         row["started_at"], row.get("finished_at"), row.get("latency_ms"), row.get("dry_run"),
         json.dumps(row["record"], default=str), row.get("key_id"), row.get("team"),
         instance])

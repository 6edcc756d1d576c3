"""The cost ledger: one row per model call, in an embedded DuckDB file.

Facts that shape it (measured here, see ../shared notes in the repository's history):
while one process holds a DuckDB file read-write no other process can open it at all, and
per-row inserts manage ~1,000 rows/s while an appender fed by one writer thread reaches
~190,000 with the event loop undisturbed. So:

- `record()` only queues the row: it never blocks the request path. Every 500th row seals
  the waiting rows into a frame (pickled columns, ~0.3 ms); see `record()` for why there.
- One writer thread sends sealed frames, four at a time, and seals and sends the rest once
  per `flush_interval` (1 s), to the store that owns the file. A graceful close
  drains everything; a hard kill loses at most one interval. In the server the store is a
  child process (`_ProcessStore`): turning frames into numpy columns and inserting them
  runs on the child's GIL, not the event loop's, and the child gathers what arrives within
  50 ms into one insert (an insert costs ~3.5 ms before its first row).
- The process that holds the file (`flowc serve`) is the *owner*. Another process
  (`flowc run` in a second terminal) cannot open it, so it writes its rows as Parquet
  segments into `<ledger>.inbox/`, which the owner ingests on its next flush. Readers go
  through the owner (`flowc costs` asks the server) or, when no server runs, open the file
  read-only.
- User SQL cannot write and cannot touch files: only statements DuckDB classifies as SELECT
  are accepted, each runs in a READ ONLY transaction that is always rolled back (a SELECT
  may still hold DELETE/UPDATE/INSERT in its WITH clause: DuckDB refuses the write), on its
  own cursor, stopped (`interrupt()`) after `FLOWC_SQL_TIMEOUT` seconds; the database is
  opened with external access disabled, its configuration locked and its memory capped
  (`FLOWC_LEDGER_MEMORY_LIMIT`). Queries never take the insert lock: in the child they run
  on their own threads while its main loop keeps inserting (measured: a query scanning
  3M rows beside 1,000-row inserts, the inserts went on, worst 22 ms).
- A row that cannot be stored as given (a cost past DECIMAL(18, 9), a count past BIGINT, a
  time out of range, text that is not UTF-8) is stored clamped with `clamped = true`; the
  fast columnar insert is tried first, and only a batch it refuses is fixed row by row.
- A server that finds the file held (an orphaned ledger process of a killed server, a
  `flowc run` in progress) writes segments, says so on `/ready`, and takes the file over as
  soon as it is free. The ledger process ends when its server does (the pipe closes, or
  its parent changes), interrupting a running query, so it never keeps the file.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import fcntl
import importlib
import itertools
import json
import logging
import multiprocessing as mp
import operator
import os
import pickle
import queue
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from runtime.ledger.schema import REQUEST_COLUMNS, migrate

log = logging.getLogger("flowc.ledger")
_FRAME = 500  # rows sealed into one frame (~0.3 ms of the recording thread's time)
_WAKE_FRAMES = 4  # sealed frames that wake the writer (each wake is a GIL hand-off)
_CHILD_ROWS = 20_000  # rows the child gathers from the pipe into one insert, at most
_GATHER = 0.05  # seconds the child waits for more rows before inserting
_SQL_TIMEOUT = 5.0  # seconds a user query may run (FLOWC_SQL_TIMEOUT)
# DuckDB's buffer pool otherwise grows to 80% of RAM, caching the file as it grows
# (FLOWC_LEDGER_MEMORY_LIMIT); a query that needs more fails with DuckDB's out-of-memory error.
_MEMORY_LIMIT = "1GB"
# Rows appended since DuckDB's last checkpoint stay in memory uncompressed (~300 bytes a
# row against ~12 once checkpointed) until the write-ahead log reaches this size. At
# DuckDB's default (16MB, ~85,000 rows) that is ~25 MB, which at 200 rows/s the ledger
# process climbed for 7 minutes before each drop; at 4MB (~21,000 rows) ~6 MB. Bursts of
# 500,000 rows measured 120-140k rows/s against 120-180k at 16MB (docs/benchmarks.md). At
# 2MB (~10,000 rows, a checkpoint every ~50 s at 200 rows/s) the ledger process's saw-tooth
# is ~2.5 MB instead of ~4.5, small enough that a 10-minute soak can tell flat from growing;
# bursts measured 141k rows/s (109-144k) against 158k (149-160k) at 4MB, the same machine.
_CHECKPOINT_WAL = "2MB"
# The file's blocks DuckDB may keep cached beyond one insert or query (`_BlockCache`). Less
# than 1MB made DuckDB write rows waiting for a checkpoint to a temporary file instead.
_FILE_CACHE = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt(3)'s parameter number (malloc.h)
_QUERY_THREADS = 2  # user queries running at once in the ledger process
_RETRY = 1.0  # seconds between attempts to take over a ledger file another process held
_SAFE_CONFIG = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
}


class SQLRefused(ValueError):
    """A user query that is not a read-only SELECT."""


class QueryTimeout(ValueError):
    """A user query stopped at the time limit."""


class LedgerUnavailable(RuntimeError):
    """This process does not hold the ledger file (now): queries cannot be answered."""


_ERRORS: dict[str, type[Exception]] = {
    c.__name__: c for c in (SQLRefused, QueryTimeout, LedgerUnavailable)}


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 86_400 or value != value:
        log.warning("%s=%r is not a number of seconds; using %g", name, raw, default)
        return default
    return value


def default_sql_timeout() -> float:
    """Seconds a user query may run: FLOWC_SQL_TIMEOUT, else 5."""
    return _env_seconds("FLOWC_SQL_TIMEOUT", _SQL_TIMEOUT)


def memory_limit() -> str:
    """DuckDB's memory cap for the ledger: FLOWC_LEDGER_MEMORY_LIMIT (e.g. 512MB, 2GB)."""
    raw = os.environ.get("FLOWC_LEDGER_MEMORY_LIMIT", "").strip()
    if not raw:
        return _MEMORY_LIMIT
    if not re.fullmatch(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", raw, re.I):
        log.warning("FLOWC_LEDGER_MEMORY_LIMIT=%r is not a size like 512MB; using %s", raw,
                    _MEMORY_LIMIT)
        return _MEMORY_LIMIT
    return raw


@dataclass
class CallRecord:
    """One model call, as the ledger stores it."""

    model: str
    provider: str | None
    served_model: str | None
    success: bool
    latency_ms: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_1h_tokens: int = 0  # of cache_write_tokens
    status: str | None = None  # ok | error | cancelled; None: from `success`
    usage_estimated: bool = False  # token counts estimated, not reported by the provider
    cost_usd: Decimal | None = None
    price_source: str | None = None
    ttft_ms: float | None = None
    error: str | None = None
    error_class: str | None = None
    route: str | None = None
    stream: bool = False
    dry_run: bool = False
    workflow_name: str | None = None
    run_id: str | None = None
    step_id: str | None = None
    key_id: str | None = None  # the virtual key that made the call (docs/keys.md)
    key_name: str | None = None
    team: str | None = None
    tags: str | None = None  # "k=v,k2=v2", sorted: the key's tags and the request's
    cached: bool = False  # a step's cached result was reused: no call was made
    saved_usd: Decimal | None = None  # on a cached row: what the call had cost
    id: str = ""
    ts: float = field(default_factory=time.time)  # when the call ended (epoch seconds)



def connect(path: Path, *, read_only: bool = False, memory: str | None = None
            ) -> duckdb.DuckDBPyConnection:
    """Open the ledger with file access locked down and memory capped (and the schema
    migrated if writable).

    The writable ledger lives inside the server, whose event loop needs the cores: with
    DuckDB's default thread pool (one thread per core) the ledger added ~0.1 ms to a
    gateway request's p50; with one thread, ~0.02 ms, and spend by day and model over 10M
    rows still takes ~0.2 s. Read-only opens (the CLI, with no server) use every core."""
    path.parent.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {**_SAFE_CONFIG, "lock_configuration": True,
                              "memory_limit": memory or memory_limit()}
    if not read_only:
        config["threads"] = 1
        config["checkpoint_threshold"] = _CHECKPOINT_WAL
        # The store lowers the limit for a moment to evict the file's blocks (`_BlockCache`);
        # user SQL still cannot change it (only SELECT statements are accepted).
        config["allowed_configs"] = ["memory_limit"]
    con = duckdb.connect(str(path), read_only=read_only, config=config)
    if not read_only:
        migrate(con)
    return con


def is_locked_error(exc: Exception) -> bool:
    return "lock" in str(exc).lower()


def file_free(path: Path) -> bool:
    """Whether no process holds the DuckDB file (DuckDB takes an fcntl lock on it), tried
    without opening the database: a take-over attempt costs a process start."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def check_select(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse anything but one SELECT (DuckDB's own classification; a SELECT may still try
    to write in a WITH clause, which the READ ONLY transaction refuses)."""
    statements = con.extract_statements(sql)
    if len(statements) != 1:
        raise SQLRefused("give exactly one SELECT statement")
    if statements[0].type != duckdb.StatementType.SELECT:
        raise SQLRefused(f"only SELECT queries are allowed, not {statements[0].type.name}")


class Queries:
    """Read-only queries, each on its own cursor; what runs can be interrupted at once."""

    def __init__(self) -> None:
        self._running: set[duckdb.DuckDBPyConnection] = set()
        self._lock = threading.Lock()
        self.closing = False

    def run(self, cur: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = (),
            timeout: float | None = None) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run one query on ``cur`` (closed after), in a READ ONLY transaction that is
        always rolled back, interrupted after ``timeout`` seconds (None: no limit)."""
        timer = None
        stopped = threading.Event()

        def stop() -> None:
            stopped.set()
            cur.interrupt()

        with self._lock:
            if self.closing:
                cur.close()
                raise LedgerUnavailable("the ledger is closing")
            self._running.add(cur)
        try:
            check_select(cur, sql)
            cur.execute("BEGIN TRANSACTION READ ONLY")
            if timeout is not None:
                timer = threading.Timer(timeout, stop)
                timer.daemon = True
                timer.start()
            try:
                rel = cur.execute(sql, list(params))
                columns = [d[0] for d in rel.description or ()]
                return columns, rel.fetchall()
            except duckdb.InterruptException:
                if stopped.is_set():
                    raise QueryTimeout(
                        f"the query ran past the {timeout:g} s limit and was stopped "
                        "(FLOWC_SQL_TIMEOUT sets the limit)") from None
                raise LedgerUnavailable("the query was stopped: the ledger is closing"
                                        ) from None
            except duckdb.TransactionException as exc:
                if "read-only" in str(exc):
                    raise SQLRefused("queries are read-only: this one writes (a DELETE, "
                                     "UPDATE or INSERT inside it)") from None
                raise
        finally:
            if timer is not None:
                timer.cancel()
            with self._lock:
                self._running.discard(cur)
            with contextlib.suppress(duckdb.Error):
                cur.execute("ROLLBACK")
            cur.close()

    def interrupt(self) -> None:
        """Stop every running query (the ledger is closing, or its server is gone)."""
        with self._lock:
            self.closing = True
            running = list(self._running)
        for cur in running:
            with contextlib.suppress(duckdb.Error):
                cur.interrupt()


def run_select(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = (),
               timeout: float | None = None) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run one read-only query (see `Queries.run`); returns column names and rows."""
    return Queries().run(con.cursor(), sql, params, timeout)


# A batch goes in as columns (numpy arrays that DuckDB scans natively): ~4x faster than
# DuckDB's row appender, which converts every Python value on its own. The cost travels as
# text and is cast to DECIMAL in the database: exact, and faster than Decimal objects.
_INSERT = """
    INSERT INTO requests SELECT
        id, make_timestamp(ts_us), workflow_name, run_id, step_id, model, provider,
        served_model, prompt_tokens, completion_tokens, prompt_tokens + completion_tokens,
        cached_tokens, cache_write_tokens, reasoning_tokens, CAST(cost AS DECIMAL(18, 9)),
        price_source, latency_ms, CAST(ttft_ms AS DOUBLE), success, CAST(error AS VARCHAR),
        CAST(error_class AS VARCHAR), CAST(route AS VARCHAR), stream, dry_run,
        cache_write_1h_tokens,
        coalesce(CAST(status AS VARCHAR), CASE WHEN success THEN 'ok' ELSE 'error' END),
        usage_estimated, clamped, CAST(key_id AS VARCHAR), CAST(key_name AS VARCHAR),
        CAST(team AS VARCHAR), CAST(tags AS VARCHAR), cached, CAST(saved AS DECIMAL(18, 9))
    FROM batch"""
_TEXT = ("workflow_name", "run_id", "step_id", "model", "provider", "served_model",
         "price_source", "error", "error_class", "route", "status", "key_id", "key_name",
         "team", "tags")
_INTS = ("prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens",
         "reasoning_tokens", "cache_write_1h_tokens")
_BOOLS = ("success", "stream", "dry_run", "usage_estimated", "cached")
# A row waits as the tuple of its record's `_FIELDS` (read by an attrgetter, in C); a frame
# travels as `Columns` (one sequence per name, transposed in C) with the cost as text:
# pickling a Decimal costs ~2.6 µs, its text ~0.1.
_FIELDS = ("id", "ts", "cost_usd", "latency_ms", "ttft_ms", *_TEXT, *_INTS, *_BOOLS,
           "saved_usd")
_fields_of = operator.attrgetter(*_FIELDS)
Columns = dict[str, Sequence[Any]]


def _text(cost: Decimal | None) -> str | None:
    return None if cost is None else str(cost)


def _columns_of(rows: Sequence[tuple[Any, ...]]) -> Columns:
    """Rows of `_FIELDS` (as `record()` queues them) as `Columns`."""
    cols: Columns = dict(zip(_FIELDS, zip(*rows, strict=True), strict=True))
    cols["cost_usd"] = tuple(map(_text, cols["cost_usd"]))
    cols["saved_usd"] = tuple(map(_text, cols["saved_usd"]))
    return cols


def _concat(batches: list[Columns]) -> Columns:
    if len(batches) == 1:
        return batches[0]
    out: Columns = {name: list(itertools.chain.from_iterable(b[name] for b in batches))
                    for name in _FIELDS}
    if any("clamped" in b for b in batches):  # only batches that were fixed carry the flag
        out["clamped"] = list(itertools.chain.from_iterable(
            b.get("clamped") or (False,) * _length(b) for b in batches))
    return out


def _length(cols: Columns) -> int:
    return len(cols["ts"])


def _frame(rows: list[tuple[Any, ...]]) -> bytes:
    """Rows of `_FIELDS`, sealed: `Columns`, pickled (repeated strings are stored once).
    A value that cannot be pickled (a caller's odd object) costs its row a fix, not the
    frame."""
    cols = _columns_of(rows)
    try:
        return pickle.dumps(cols, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return pickle.dumps(_sanitized(cols), protocol=pickle.HIGHEST_PROTOCOL)


def _unframe(frames: list[bytes]) -> Columns:
    return _concat([pickle.loads(f) for f in frames])


def _with_ids(c: Columns, new_ids: Callable[[int], list[str]]) -> Columns:
    """Rows without an id get new ones (before an insert that may be retried)."""
    ids = c["id"]
    if all(ids):
        return c
    if not any(ids):  # the usual case: records from this process carry no id
        return {**c, "id": new_ids(len(ids))}
    fresh = iter(new_ids(len(ids)))
    return {**c, "id": [i or next(fresh) for i in ids]}


_TS_MAX = 253_402_300_799.0  # 9999-12-31 23:59:59: the last second Python reads back


def _columns(c: Columns) -> dict[str, Any]:
    """`Columns` (with ids) as the numpy arrays `_INSERT` reads. Raises on a value the
    columns cannot hold (numpy refuses an int past int64); the caller then fixes rows."""
    ts = np.array(c["ts"], dtype=np.float64)
    if not (np.isfinite(ts).all() and (ts >= 0).all() and (ts <= _TS_MAX).all()):
        raise ValueError("a time out of range")  # a float-to-int cast would wrap silently
    n = len(ts)
    cols: dict[str, Any] = {
        "id": np.array(c["id"], dtype=object),
        "ts_us": (ts * 1_000_000).astype(np.int64),
        "cost": np.array(c["cost_usd"], dtype=object),  # text or None
        "saved": np.array(c["saved_usd"], dtype=object),  # text or None
        "latency_ms": np.array(c["latency_ms"], dtype=np.float64),
        "ttft_ms": np.array(c["ttft_ms"], dtype=object),
        "clamped": np.array(c["clamped"], dtype=np.bool_) if "clamped" in c
        else np.zeros(n, dtype=np.bool_),
    }
    for name in _TEXT:
        cols[name] = np.array(c[name], dtype=object)
    for name in _INTS:
        cols[name] = np.array(c[name], dtype=np.int64)
    for name in _BOOLS:
        cols[name] = np.array(c[name], dtype=np.bool_)
    return cols


# -- rows that cannot be stored as given -----------------------------------------------------
_INT64 = 2**63 - 1
_HALF = 2**62 - 1  # two counts this size still sum (total_tokens) within BIGINT
_COST_MAX = Decimal("999999999.999999999")  # DECIMAL(18, 9)
_NANO = Decimal("1e-9")
# What a batch with a bad value raises: numpy (an int past int64, text where a number
# goes), DuckDB (a cost past DECIMAL(18, 9), a sum past BIGINT, text that is not UTF-8).
_DATA_ERRORS = (OverflowError, ValueError, TypeError, UnicodeError, duckdb.ConversionException,
                duckdb.OutOfRangeException, duckdb.InvalidInputException,
                duckdb.TypeMismatchException)


def _fix_int(v: Any) -> tuple[int, bool]:
    if type(v) is int and -_INT64 <= v <= _INT64:
        return v, False
    try:
        n = int(v)  # a bool, a float, a numeric string
    except (TypeError, ValueError, OverflowError):
        return 0, True
    fixed = max(-_INT64, min(_INT64, n))
    return fixed, fixed != v


def _fix_float(v: Any, *, nullable: bool) -> tuple[float | None, bool]:
    if v is None:
        return (None, False) if nullable else (float("nan"), False)
    if type(v) is float:
        return v, False
    try:
        return float(v), False
    except (TypeError, ValueError, OverflowError):
        return None if nullable else float("nan"), True


def _fix_cost(v: Any) -> tuple[str | None, bool]:
    if v is None:
        return None, False
    try:
        d = Decimal(v) if isinstance(v, str | int | Decimal) else Decimal(repr(float(v)))
    except (InvalidOperation, TypeError, ValueError):
        return None, True
    if not d.is_finite():  # unknown, never $0
        return None, True
    try:
        d = d.quantize(_NANO)
    except InvalidOperation:  # too many digits to quantize: far past the column anyway
        return str(_COST_MAX.copy_sign(d)), True
    if abs(d) > _COST_MAX:
        return str(_COST_MAX.copy_sign(d)), True
    return format(d, "f"), False


def _fix_text(v: Any) -> tuple[str | None, bool]:
    if v is None:
        return None, False
    text = v if type(v) is str else str(v)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return text.encode("utf-8", "replace").decode("utf-8"), True
    return text, type(v) is not str


def _fix_ts(v: Any) -> tuple[float, bool]:
    try:
        t = float(v)
    except (TypeError, ValueError, OverflowError):
        return time.time(), True
    if t != t:
        return time.time(), True
    if not 0 <= t <= _TS_MAX:
        return min(max(t, 0.0), _TS_MAX), True
    return t, False


def _sanitized(c: Columns) -> Columns:
    """Every row made storable: a value that cannot be stored as given is clamped (a count
    into BIGINT, a cost into DECIMAL(18, 9)), made NULL (a cost that is not a number:
    unknown, never $0) or replaced (text that is not UTF-8), and its row marked `clamped`."""
    n = _length(c)
    out: Columns = {}
    flags = list(c["clamped"]) if "clamped" in c else [False] * n

    def fix(name: str, fixer: Callable[[Any], tuple[Any, bool]]) -> None:
        values = []
        for i, v in enumerate(c[name]):
            fixed, changed = fixer(v)
            values.append(fixed)
            if changed:
                flags[i] = True
        out[name] = values

    for name in _INTS:
        fix(name, _fix_int)
    # total_tokens is prompt + completion, summed in the database
    for i in range(n):
        p, q = out["prompt_tokens"][i], out["completion_tokens"][i]
        if not -_INT64 <= p + q <= _INT64:
            out["prompt_tokens"][i] = max(-_HALF, min(_HALF, p))
            out["completion_tokens"][i] = max(-_HALF, min(_HALF, q))
            flags[i] = True
    for name in _TEXT:
        fix(name, _fix_text)
    fix("id", _fix_text)
    fix("cost_usd", _fix_cost)
    fix("saved_usd", _fix_cost)
    fix("ts", _fix_ts)
    fix("latency_ms", lambda v: _fix_float(v, nullable=False))
    fix("ttft_ms", lambda v: _fix_float(v, nullable=True))
    for name in _BOOLS:
        out[name] = [bool(v) for v in c[name]]
    out["clamped"] = flags
    return out


def _slice(c: Columns, lo: int, hi: int) -> Columns:
    return {name: list(values[lo:hi]) for name, values in c.items()}


def _insert(con: duckdb.DuckDBPyConnection, rows: Columns,
            new_ids: Callable[[int], list[str]]) -> None:
    """Insert a batch as columns; a batch that holds a value that cannot be stored is
    fixed row by row (`_sanitized`) and inserted again, so one bad row never costs its
    neighbours. The fast path is untouched: the fix runs only after a refusal."""
    rows = _with_ids(rows, new_ids)
    try:
        _insert_columns(con, _columns(rows))
        return
    except _DATA_ERRORS as exc:
        first = exc
    fixed = _sanitized(rows)
    log.warning("ledger: a batch of %d rows was refused (%s); %d rows stored clamped "
                "(clamped = true)", _length(rows), str(first).splitlines()[0][:200],
                sum(fixed["clamped"]) - sum(rows.get("clamped") or ()))
    _insert_halves(con, fixed)


def _insert_halves(con: duckdb.DuckDBPyConnection, rows: Columns) -> None:
    """Insert fixed rows; should one still be refused, halves find it (~2 log2(n)
    inserts) and only that row is lost, logged."""
    try:
        _insert_columns(con, _columns(rows))
        return
    except _DATA_ERRORS:
        if _length(rows) == 1:
            log.exception("ledger: row %s could not be stored even clamped", rows["id"][0])
            return
    half = _length(rows) // 2
    _insert_halves(con, _slice(rows, 0, half))
    _insert_halves(con, _slice(rows, half, _length(rows)))


def _insert_columns(con: duckdb.DuckDBPyConnection, columns: dict[str, Any]) -> None:
    con.register("batch", columns)
    try:
        con.execute(_INSERT)
    finally:
        con.unregister("batch")


def _segment_column(name: str, have: set[str]) -> str:
    """How a segment's column is read: one from an older flowc may lack it, or hold NULL
    token counts (read as 0)."""
    if name in _INTS:
        return f"coalesce({name}, 0) AS {name}" if name in have else f"0 AS {name}"
    if name in _BOOLS or name == "clamped":
        return f"coalesce({name}, false) AS {name}" if name in have else f"false AS {name}"
    if name in have:
        return name
    return f"NULL AS {name}"


def _segment_columns(t: dict[str, Any]) -> Columns:
    """`Columns` read back from a Parquet segment."""
    def plain(values: Any) -> list[Any]:
        return [None if v is None or v != v else v for v in values.tolist()]

    c: Columns = {name: plain(t[name]) for name in (*_TEXT, *_INTS, *_BOOLS, "id",
                                                     "latency_ms", "ttft_ms", "clamped")}
    c["ts"] = (t["ts"].astype("datetime64[us]").astype(np.int64) / 1_000_000).tolist()
    c["cost_usd"] = t["cost_text"].tolist()  # exact, as text
    c["saved_usd"] = plain(t["saved_text"])
    return c


class _Purge:
    """Hands the memory DuckDB freed back to the system, at most once a second.

    DuckDB allocates through its own jemalloc (linked into the Linux wheel, so glibc's
    malloc_trim cannot reach it), which keeps freed pages for reuse until purged. Every
    checkpoint frees ~20-80 MB of temporaries, and in the ledger process (one DuckDB
    thread) they stayed resident: at 1,000 rows/s jemalloc held 17-94 MB for 2-11 MB in
    use; purged after inserts, 6-16 MB, a purge ~0.3 ms (p99 ~6). DuckDB's
    allocator_flush_threshold and allocator_background_threads changed nothing here. A
    build without jemalloc (no such symbol) is left alone."""

    def __init__(self) -> None:
        self._next = 0.0
        try:
            library = importlib.import_module("_duckdb").__file__
            mallctl = ctypes.CDLL(library).duckdb_je_mallctl
        except (ImportError, OSError, AttributeError, TypeError):
            self._mallctl = None
            return
        mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_void_p, ctypes.c_size_t]
        mallctl.restype = ctypes.c_int
        self._mallctl = mallctl

    def due(self) -> bool:
        """Whether a second has passed since the last purge."""
        return time.monotonic() >= self._next

    def __call__(self) -> None:
        self._next = time.monotonic() + 1.0
        if self._mallctl is not None:
            self._mallctl(b"arena.4096.purge", None, None, None, 0)  # 4096: every arena


class _BlockCache:
    """Keeps DuckDB's cache of the ledger file's blocks at `_FILE_CACHE` bytes.

    DuckDB keeps every block of the file it has read or checkpointed in its buffer pool
    until the pool reaches `memory_limit` (1GB): the ledger process grew with the table
    (~26 bytes a row; a cost summary reads every block back in). DuckDB evicts those
    blocks first when its limit is lowered (SET memory_limit), so this sets the limit to
    what everything else holds plus `_FILE_CACHE`, then back. The blocks are still in the
    system's page cache: reading them again costs a copy, not a disk read. Only with no
    query running (a query must never see the lowered limit)."""

    def __init__(self, limit: str) -> None:
        self._limit = limit

    def trim(self, con: duckdb.DuckDBPyConnection) -> None:
        held = dict(con.execute("SELECT tag, memory_usage_bytes FROM duckdb_memory()"
                                ).fetchall())
        blocks = held.get("BASE_TABLE", 0)
        if blocks <= _FILE_CACHE:
            return
        try:
            con.execute(f"SET memory_limit = '{sum(held.values()) - blocks + _FILE_CACHE}B'")
        except duckdb.OutOfMemoryException:  # DuckDB keeps its limit; next time
            return
        finally:
            con.execute(f"SET memory_limit = '{self._limit}'")


class _Store:
    """The open ledger file: the only code that writes to it or reads from it. Writes share
    `lock`; queries run on their own cursors without it."""

    def __init__(self, path: Path, memory: str | None = None) -> None:
        self.con = connect(path, memory=memory)
        self.lock = threading.Lock()  # inserts, runs and trusted statements
        self.queries = Queries()
        self._prefix = uuid.uuid4().hex[:16] + "-"  # row ids: this store + a sequence
        self._seq = 0
        self._purge = _Purge()
        self._cache = _BlockCache(memory or memory_limit())
        self._queries = 0  # running on their own cursors (under `lock`)

    def _new_ids(self, n: int) -> list[str]:
        start, self._seq = self._seq + 1, self._seq + n
        return [f"{self._prefix}{i:x}" for i in range(start, start + n)]

    def insert_frames(self, frames: list[bytes]) -> None:
        self.insert_rows(_unframe(frames))

    def insert_rows(self, rows: Columns) -> None:
        if not _length(rows):
            return
        with self.lock:
            _insert(self.con, rows, self._new_ids)
            if self._purge.due():
                self._trim()

    def _trim(self) -> None:
        """Give back what the last insert or query left cached (with `lock` held)."""
        if not self._queries and not self.queries.closing:
            try:
                self._cache.trim(self.con)
            except duckdb.Error:
                log.exception("ledger: could not trim DuckDB's cache")
        self._purge()

    def select(self, sql: str, params: Sequence[Any] = (), timeout: float | None = None
               ) -> tuple[list[str], list[tuple[Any, ...]]]:
        with self.lock:  # a cursor is a new connection to the same database: cheap
            cur = self.con.cursor()
            self._queries += 1
        try:
            return self.queries.run(cur, sql, params, timeout)
        finally:
            with self.lock:
                self._queries -= 1
                self._trim()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.lock:
            cur = self.con.cursor()
            try:
                return cur.execute(sql, list(params)).fetchall()
            finally:
                cur.close()

    def insert_run(self, row: dict[str, Any]) -> None:
        self.execute("INSERT OR REPLACE INTO runs (id, workflow_name, inputs_hash, status, "
                     "started_at, finished_at, latency_ms, dry_run, record, key_id, team) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     [row["id"], row["workflow_name"], row["inputs_hash"], row["status"],
                      row["started_at"], row["finished_at"], row["latency_ms"],
                      row["dry_run"], json.dumps(row["record"], default=str),
                      row.get("key_id"), row.get("team")])

    def ingest(self, inbox: Path) -> None:
        """Take in what other processes left in the inbox: row segments, then run records
        (a run is written after its rows, there as here)."""
        self._ingest_segments(sorted(inbox.glob("*.parquet")))
        for run_file in sorted(inbox.glob("run-*.json")):
            try:
                self.insert_run(json.loads(run_file.read_text()))
            except Exception:
                log.exception("ledger: run record %s left in place", run_file)
                continue
            run_file.unlink(missing_ok=True)

    def _ingest_segments(self, files: list[Path]) -> None:
        if not files:
            return
        # The ledger itself has file access disabled: segments are read by a separate,
        # in-memory database.
        mem = duckdb.connect()
        try:
            for f in files:
                try:
                    # A segment from an older flowc lacks the newer columns; token counts
                    # it lacks (or left NULL) read as 0.
                    have = {d[0] for d in mem.execute("SELECT * FROM read_parquet(?) LIMIT 0",
                                                      [str(f)]).description or ()}
                    columns = ", ".join(_segment_column(c, have) for c in REQUEST_COLUMNS)
                    saved = ("CAST(saved_usd AS VARCHAR)" if "saved_usd" in have
                             else "NULL::VARCHAR")
                    got = mem.execute(
                        f"SELECT {columns}, CAST(cost_usd AS VARCHAR) AS cost_text, "
                        f"{saved} AS saved_text FROM read_parquet(?)", [str(f)]).fetchnumpy()
                    self.insert_rows(_segment_columns(got))
                except duckdb.Error:
                    log.exception("ledger: segment %s left in place", f)
                    continue
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
        finally:
            mem.close()

    def close(self) -> None:
        self.queries.interrupt()
        with self.lock:
            self.con.close()


class _ProcessStore:
    """A `_Store` in a child process, so turning rows into columns and inserting them never
    competes with the server's event loop for the GIL. Calls carry an id and are answered
    with it: queries run beside inserts in the child and may be answered out of order. A
    call's exception is raised again here with its type."""

    def __init__(self, path: Path, memory: str | None = None) -> None:
        ctx = mp.get_context("spawn")  # never fork a process that runs threads and a loop
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_store_process,
                                 args=(child, str(path), memory, os.getpid()),
                                 name="flowc-ledger", daemon=True)
        self._proc.start()
        child.close()
        self._send_lock = threading.Lock()
        self._pending: dict[int, Future[Any]] = {}
        self._ids = itertools.count(1)
        self.alive = True
        try:
            status, detail = self._conn.recv()
        except EOFError:
            status, detail = "error", "the ledger process exited while starting"
        if status != "ready":
            self._proc.join(10)
            self._conn.close()
            raise duckdb.IOException(detail)
        threading.Thread(target=self._receive, name="flowc-ledger-replies",
                         daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def _receive(self) -> None:
        while True:
            try:
                rid, *reply = self._conn.recv()
            except (EOFError, OSError):
                break
            except Exception as exc:  # unreadable: nothing after it can be trusted either
                log.error("ledger: a reply could not be read (%s: %s); letting the "
                          "connection go", type(exc).__name__, exc)
                break
            fut = self._pending.pop(rid, None)
            if fut is None or not fut.set_running_or_notify_cancel():
                continue  # nobody waits for it any more (a request given up on)
            if reply[0] == "ok":
                fut.set_result(reply[1])
                continue
            _, module, name, text = reply
            if name in _ERRORS:
                fut.set_exception(_ERRORS[name](text))
            elif module.startswith(("duckdb", "_duckdb")):
                fut.set_exception(getattr(duckdb, name, duckdb.Error)(text))
            else:
                fut.set_exception(RuntimeError(f"{name}: {text}"))
        with self._send_lock:  # here, once nothing reads it (see `_hang_up`)
            self.alive = False
            with contextlib.suppress(OSError):
                self._conn.close()
        for rid in list(self._pending):
            fut = self._pending.pop(rid, None)
            if fut is not None and fut.set_running_or_notify_cancel():
                fut.set_exception(LedgerUnavailable("the ledger process exited"))

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            if not self.alive:
                raise LedgerUnavailable("the ledger process exited")
            try:
                self._conn.send(message)
            except (OSError, ValueError) as exc:
                self.alive = False
                raise LedgerUnavailable(f"the ledger process is gone ({exc})") from None

    def _call(self, op: str, *args: Any) -> Any:
        return self._request(op, *args).result()  # _receive fails it if the child exits

    def _request(self, op: str, *args: Any) -> Future[Any]:
        """Send a call; its answer (or error) arrives in the future."""
        rid = next(self._ids)
        fut: Future[Any] = Future()
        self._pending[rid] = fut
        try:
            self._send((op, rid, *args))
        except LedgerUnavailable:
            self._pending.pop(rid, None)
            raise
        return fut

    def insert_frames(self, frames: list[bytes]) -> None:
        """Sent without waiting: the child inserts while this process goes on (it logs a
        batch it cannot write). Calls sent later are answered after it, except queries."""
        self._send(("rows", frames))

    def select(self, sql: str, params: Sequence[Any] = (), timeout: float | None = None
               ) -> tuple[list[str], list[tuple[Any, ...]]]:
        return self._call("select", sql, list(params), timeout)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._call("execute", sql, list(params))

    def insert_run(self, row: dict[str, Any]) -> None:
        self._call("run", row)

    def ingest(self, inbox: Path) -> None:
        self._call("ingest", str(inbox))

    def close(self) -> None:
        with contextlib.suppress(LedgerUnavailable, EOFError, OSError):
            self._call("close")
        self._proc.join(30)
        self._hang_up()

    def _hang_up(self) -> None:
        """End the connection for both ends: the reader thread wakes to its end and closes
        it. Closed here, its descriptor could be freed while that thread still reads it,
        and a socket opened meanwhile under the same number read in its place."""
        with self._send_lock:
            if not self.alive:  # the reader has closed it
                return
            with contextlib.suppress(OSError, ValueError), \
                    socket.socket(fileno=os.dup(self._conn.fileno())) as s:
                s.shutdown(socket.SHUT_RDWR)


def _fixed_mmap_threshold() -> None:
    """Keep glibc's mmap threshold at its default (128 KiB) in the ledger process.

    glibc raises the threshold to the size of each mmapped block freed (up to 32 MB), so
    after the first checkpoints DuckDB's large temporaries came from the heap instead and
    left it fragmented: in a 10-minute soak its free chunks grew 4.0 to 6.8 MB, most of the
    process's growth. Setting M_MMAP_THRESHOLD turns the adjustment off (mallopt(3)); those
    blocks are mapped and unmapped again, and the heap's free space stayed at ~1.5 MB. No
    effect where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


def _store_process(conn: Any, path: str, memory: str | None, parent: int) -> None:
    """The child's loop: one `_Store`; rows, runs, ingests and trusted statements one at a
    time on this thread, queries on their own threads, until `close`, EOF, or the parent
    is gone."""
    _fixed_mmap_threshold()
    try:
        store = _Store(Path(path), memory)
    except Exception as exc:
        conn.send(("locked" if is_locked_error(exc) else "error", str(exc)))
        return
    conn.send(("ready", None))
    send_lock = threading.Lock()  # this thread and the query threads answer

    def reply(message: tuple[Any, ...]) -> None:
        with send_lock, contextlib.suppress(OSError, ValueError):
            conn.send(message)

    def failure(rid: int, exc: Exception) -> tuple[Any, ...]:
        return (rid, "err", type(exc).__module__, type(exc).__name__, str(exc))

    # A thread keeps reading the pipe while an insert runs: a full pipe would block the
    # server's writer in send() (measured: ~2.5 ms a send, and a backlog of 100k+ rows at
    # 100k rows/s), and every blocked send costs it a GIL hand-off in the server.
    received: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()

    def read() -> None:
        while True:
            try:
                # The pipe closes when the server dies; a parent that changed (the
                # server is gone, this process was adopted) ends it too, in case another
                # process inherited the server's end of the pipe.
                if not conn.poll(1.0):
                    if os.getppid() != parent:
                        raise EOFError
                    continue
                received.put(conn.recv())
            except (EOFError, OSError):  # the server is gone: what was written stays
                store.queries.interrupt()  # a query must not keep the file from the next
                received.put(("eof",))
                return

    threading.Thread(target=read, name="flowc-ledger-reader", daemon=True).start()
    pool = ThreadPoolExecutor(_QUERY_THREADS, thread_name_prefix="flowc-ledger-query")

    def query(rid: int, sql: str, params: list[Any], timeout: float | None) -> None:
        try:
            reply((rid, "ok", store.select(sql, params, timeout)))
        except Exception as exc:
            reply(failure(rid, exc))

    handlers: dict[str, Callable[..., Any]] = {
        "execute": store.execute, "run": store.insert_run,
        "ingest": lambda inbox: store.ingest(Path(inbox))}
    message: tuple[Any, ...] | None = None
    closing: int | None = None
    try:
        while True:
            op, *args = message or received.get()
            message = None
            if op == "rows":
                # An insert costs ~3.5 ms of CPU before its first row (binding the columns,
                # planning, committing), so rows that arrive within `_GATHER` seconds go in
                # together: 500 rows an insert manage ~100k rows/s on a whole core, 5,000
                # ~210k. This process has its own GIL: a long insert never stalls the
                # server's event loop.
                frames = list(args[0])
                until = time.monotonic() + _GATHER
                while len(frames) * _FRAME < _CHILD_ROWS:
                    try:
                        message = received.get(timeout=max(0.0, until - time.monotonic()))
                    except queue.Empty:
                        break
                    if message[0] != "rows":
                        break
                    frames.extend(message[1])
                    message = None
                try:  # nobody waits for an answer to rows
                    store.insert_frames(frames)
                except Exception:
                    log.exception("ledger: could not write %d frames of rows", len(frames))
                continue
            if op == "eof":
                break
            rid, *args = args
            if op == "close":
                closing = rid
                break
            if op == "select":  # never on this thread: inserts go on while it runs
                pool.submit(query, rid, *args)
                continue
            try:
                reply((rid, "ok", handlers[op](*args)))
            except Exception as exc:
                reply(failure(rid, exc))
    finally:
        store.queries.interrupt()
        pool.shutdown(wait=True, cancel_futures=True)
        store.close()
        if closing is not None:
            reply((closing, "ok", None))


class Ledger:
    """Records calls without blocking; see the module docstring for the design.

    ``in_process=False`` (the server's choice) keeps the file in a child process, and, while
    another process holds the file, takes it over as soon as it is free (``take_over``).
    ``sql_timeout`` (seconds, default FLOWC_SQL_TIMEOUT or 5) bounds user queries;
    ``memory`` (default FLOWC_LEDGER_MEMORY_LIMIT or 1GB) caps DuckDB's memory."""

    def __init__(self, path: str | Path, flush_interval: float = 1.0, *,
                 in_process: bool = True, take_over: bool | None = None,
                 sql_timeout: float | None = None, memory: str | None = None) -> None:
        self.path = Path(path)
        self.inbox = self.path.with_name(self.path.name + ".inbox")
        self.flush_interval = flush_interval
        self.sql_timeout = sql_timeout if sql_timeout is not None else default_sql_timeout()
        self._memory = memory or memory_limit()
        self._in_process = in_process
        self._take_over = (not in_process) if take_over is None else take_over
        # Rows wait in `_rows` until `_FRAME` of them are sealed into a frame by the thread
        # that recorded the last one; the writer thread sends sealed frames (and seals what
        # is left once per interval). See `record()` for why.
        self._rows: list[tuple[Any, ...]] = []
        self._rows_lock = threading.Lock()
        self._frames: collections.deque[tuple[int, bytes]] = collections.deque()  # (rows, frame)
        self._runs: collections.deque[dict[str, Any]] = collections.deque()  # run records
        self.rows_written = 0  # for /metrics (runtime/observe/metrics.py)
        self._wake = threading.Event()
        self._flushed = threading.Condition()
        self._started = self._generation = 0  # writer passes started and completed
        self._sync = False  # a flush() waits for the store to confirm what it was sent
        self._closing = False
        self._store: _Store | _ProcessStore | None = None
        self._next_try = 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.inbox.mkdir(parents=True, exist_ok=True)
        self._open()
        self._thread = threading.Thread(target=self._run, name="flowc-ledger", daemon=True)
        self._closed = False
        self._thread.start()

    def _open(self) -> bool:
        """Try to hold the file; False (and segments to the inbox) while another process
        does."""
        try:
            self._store = _Store(self.path, self._memory) if self._in_process \
                else _ProcessStore(self.path, self._memory)
        except duckdb.IOException as exc:
            if not is_locked_error(exc):
                raise
            if self._next_try == 0.0:
                log.warning("ledger %s is held by another process: writing segments to %s%s",
                            self.path, self.inbox,
                            " until it is free" if self._take_over else "")
            self._next_try = time.monotonic() + _RETRY
            return False
        if self._next_try:
            log.warning("ledger %s: taken over; the inbox is taken in", self.path)
        return True

    def _try_take_over(self) -> None:
        """Writer thread: take the file once its holder let it go (a cheap lock probe
        first: starting the ledger process costs ~0.5 s of a core)."""
        if time.monotonic() < self._next_try:
            return
        self._next_try = time.monotonic() + _RETRY
        if not file_free(self.path):
            return
        try:
            self._open()
        except Exception:
            log.exception("ledger: could not open %s", self.path)

    def _lost(self, store: _Store | _ProcessStore) -> None:
        """The ledger process died (killed, out of memory): write segments, take over."""
        if self._store is store:
            log.error("ledger: the ledger process exited; writing segments to %s",
                      self.inbox)
            self._store = None
            self._next_try = time.monotonic()
            with contextlib.suppress(Exception):
                store.close()

    @property
    def owner(self) -> bool:
        return self._store is not None

    def status(self) -> dict[str, Any]:
        """For `/ready`: whether this process holds the file, and what waits in the inbox."""
        waiting = sum(1 for _ in self.inbox.glob("*.parquet")) if self.inbox.is_dir() else 0
        return {"owner": self.owner, "path": str(self.path), "inbox_segments": waiting}

    def record(self, call: CallRecord) -> None:
        """Queue one row (thread-safe, never blocks).

        Every `_FRAME`-th call seals the waiting rows into a frame (~0.3 ms), here rather
        than on the writer thread: a thread that needs the GIL back from a busy event loop
        waits up to the switch interval (5 ms) each time, so a writer that converted rows
        itself fell behind at ~60k rows/s; one that only sends sealed frames takes all of
        them in one hand-off. Rows wait as tuples of their fields, not as records: plain
        tuples leave the garbage collector's lists, while a backlog of records was walked
        by every full collection (50-200 ms pauses in a 500k-row burst)."""
        self.add_row(_fields_of(call))

    def add_row(self, row: tuple[Any, ...]) -> None:
        """`record()` for a row already flattened (the tuple of `_FIELDS`): as the
        supervisor of `flowc serve --workers N` takes each worker's."""
        with self._rows_lock:
            self._rows.append(row)
            if len(self._rows) < _FRAME:
                return
            rows, self._rows = self._rows, []
        self._seal(rows)
        if len(self._frames) >= _WAKE_FRAMES:
            self._wake.set()

    def _seal(self, rows: list[tuple[Any, ...]]) -> None:
        try:
            self._frames.append((len(rows), _frame(rows)))
        except Exception:  # never fail the request that happened to record the 500th row
            log.exception("ledger: could not seal %d rows", len(rows))

    def queued(self) -> int:
        """Rows recorded and not yet written (for /metrics)."""
        return len(self._rows) + sum(n for n, _ in list(self._frames))

    def close(self) -> None:
        """Write everything queued, then stop."""
        if self._closed:
            return
        self._closed = True
        self._closing = True
        self._wake.set()
        self._thread.join()
        if self._store is not None:
            self._store.close()

    def record_run(self, row: dict[str, Any]) -> None:
        """Queue a run record (see runtime/runs.py; never blocks). The writer stores it in
        the pass after its calls' rows, so a run that can be read has all its rows on the
        books; reads wait for queued runs (`_settled`), requests never do."""
        self._runs.append(row)
        self._wake.set()

    def _store_run(self, row: dict[str, Any]) -> None:
        """On the writer thread: into the store, or to the inbox when another process holds
        the ledger."""
        store = self._store
        if store is not None:
            try:
                store.insert_run(row)
                return
            except LedgerUnavailable:
                self._lost(store)
            except Exception:
                log.exception("ledger: could not store run %s", row.get("id"))
                return
        tmp = self.inbox / f".run-{row['id']}.tmp"
        tmp.write_text(json.dumps(row, default=str))
        tmp.rename(self.inbox / f"run-{row['id']}.json")

    def flush(self) -> None:
        """Block until every row queued so far is written (runs, tests, shutdown)."""
        with self._flushed:
            target = self._started + 1  # the next pass to start sees everything queued
            self._sync = True
            self._wake.set()
            self._flushed.wait_for(lambda: self._generation >= target or self._closed,
                                   timeout=60)

    # -- reading (owner only) --------------------------------------------------------------
    def _holder(self) -> _Store | _ProcessStore:
        if self._runs:  # read your own writes: a run just recorded is readable
            self.flush()
        store = self._store
        if store is None:
            retry = " (it takes the file over once that process lets go)" \
                if self._take_over else ""
            raise LedgerUnavailable(
                f"the cost ledger {self.path} is held by another process, so this one "
                f"cannot read it; its rows wait in {self.inbox.name}{retry}")
        return store

    def select(self, sql: str, params: Sequence[Any] = (), *, timeout: float | None = -1.0
               ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """A read-only query (user SQL): stopped after ``sql_timeout`` seconds (or
        ``timeout``; None: never, for flowc's own reports)."""
        limit = self.sql_timeout if timeout is not None and timeout < 0 else timeout
        return self._holder().select(sql, params, limit)

    def report(self, sql: str, params: Sequence[Any] = ()
               ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """flowc's own read-only reports (summary, export): no time limit."""
        return self.select(sql, params, timeout=None)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Trusted statements from flowc itself (workflows, runs)."""
        return self._holder().execute(sql, params)

    # -- the writer thread -----------------------------------------------------------------
    def _run(self) -> None:
        next_sync = 0.0
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            stopping = self._closing
            with self._flushed:
                self._started += 1
                # Runs queued before this pass began had their rows recorded before them,
                # so the rows taken below include them: runs go in after their rows.
                runs = len(self._runs)
                asked, self._sync = self._sync, False
            # The inbox is taken in once per interval (or when a flush asks), not on every
            # full batch: each take-in is a round trip to the store that also waits for the
            # rows sent before it, so that is also what `flush()` waits on.
            sync = asked or stopping or time.monotonic() >= next_sync
            if sync:
                next_sync = time.monotonic() + self.flush_interval
                if self._store is None and self._take_over and not stopping:
                    self._try_take_over()
            with self._rows_lock:
                rows, self._rows = self._rows, []
            if rows:
                self._seal(rows)
            sealed = [self._frames.popleft() for _ in range(len(self._frames))]
            if sealed and self._write([frame for _, frame in sealed]):
                self.rows_written += sum(n for n, _ in sealed)
            for _ in range(runs):
                self._store_run(self._runs.popleft())
            store = self._store
            if sync and store is not None:
                try:
                    store.ingest(self.inbox)
                except LedgerUnavailable:
                    self._lost(store)
                except Exception:
                    log.exception("ledger: could not ingest %s", self.inbox)
            with self._flushed:
                self._generation += 1
                self._flushed.notify_all()
            if stopping and not self._frames and not self._rows and not self._runs:
                return

    def _write(self, frames: list[bytes]) -> bool:
        store = self._store
        try:
            if store is not None:
                try:
                    store.insert_frames(frames)
                    return True
                except LedgerUnavailable:  # the rows go to the inbox instead
                    self._lost(store)
            self._write_segment(_unframe(frames))
        except Exception:  # the writer must survive a bad batch; the rows are logged
            log.exception("ledger: could not write %d frames of rows", len(frames))
            return False
        return True

    def _write_segment(self, rows: Columns) -> None:
        """A Parquet file the owner will ingest (written to a temp name, then renamed)."""
        name = f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = self.inbox / f".{name}.tmp"
        final = self.inbox / f"{name}.parquet"
        mem = duckdb.connect()
        try:
            migrate(mem)
            _insert(mem, rows, lambda n: [f"{name}-{i:x}" for i in range(1, n + 1)])
            mem.execute(f"COPY requests TO '{tmp}' (FORMAT parquet)")
        finally:
            mem.close()
        tmp.rename(final)

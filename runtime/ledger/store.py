"""The cost ledger: one row per model call, in an embedded DuckDB file.

Facts that shape it (measured here, see ../shared notes in the repository's history):
while one process holds a DuckDB file read-write no other process can open it at all, and
per-row inserts manage ~1,000 rows/s while an appender fed by one writer thread reaches
~190,000 with the event loop undisturbed. So:

- `record()` only puts the row on a queue: it never blocks the request path.
- One writer thread sends batches every `flush_interval` (1 s) or 1,000 rows to the store
  that owns the file; a graceful close drains the queue, a hard kill loses at most one
  interval. In the server the store is a child process (`_ProcessStore`): turning rows
  into columns and inserting them then runs on the child's GIL, not the event loop's.
- The process that holds the file (`flowc serve`) is the *owner*. Another process
  (`flowc run` in a second terminal) cannot open it, so it writes its rows as Parquet
  segments into `<ledger>.inbox/`, which the owner ingests on its next flush. Readers go
  through the owner (`flowc costs` asks the server) or, when no server runs, open the file
  read-only.
- User SQL is read-only and cannot touch files: the database is opened with external access
  disabled and the configuration locked, and only SELECT statements are accepted.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import multiprocessing as mp
import operator
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from runtime.ledger.schema import REQUEST_COLUMNS, migrate

log = logging.getLogger("flowc.ledger")
_BATCH = 1000
_CHUNK = 500  # rows converted here between GIL hand-offs
_CHUNK_TO_PROCESS = 500  # rows pickled for the child (it converts them on its own GIL)
_SAFE_CONFIG = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
}


class SQLRefused(ValueError):
    """A user query that is not a read-only SELECT."""


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
    id: str = ""
    ts: float = field(default_factory=time.time)  # when the call ended (epoch seconds)



def connect(path: Path, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open the ledger with file access locked down (and the schema migrated if writable).

    The writable ledger lives inside the server, whose event loop needs the cores: with
    DuckDB's default thread pool (one thread per core) the ledger added ~0.1 ms to a
    gateway request's p50; with one thread, ~0.02 ms, and spend by day and model over 10M
    rows still takes ~0.2 s. Read-only opens (the CLI, with no server) use every core."""
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {**_SAFE_CONFIG, "lock_configuration": True}
    if not read_only:
        config["threads"] = 1
    con = duckdb.connect(str(path), read_only=read_only, config=config)
    if not read_only:
        migrate(con)
    return con


def is_locked_error(exc: Exception) -> bool:
    return "lock" in str(exc).lower()


def run_select(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = ()
               ) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run one read-only query; returns column names and rows."""
    statements = con.extract_statements(sql)
    if len(statements) != 1:
        raise SQLRefused("give exactly one SELECT statement")
    if statements[0].type != duckdb.StatementType.SELECT:
        raise SQLRefused(f"only SELECT queries are allowed, not {statements[0].type.name}")
    cur = con.cursor()
    try:
        rel = cur.execute(sql, list(params))
        columns = [d[0] for d in rel.description or ()]
        return columns, rel.fetchall()
    finally:
        cur.close()


# A batch goes in as columns (numpy arrays that DuckDB scans natively): ~4x faster than
# DuckDB's row appender, which converts every Python value on its own. The cost travels as
# text and is cast to DECIMAL in the database: exact, and faster than Decimal objects.
_INSERT = """
    INSERT INTO requests SELECT
        id, make_timestamp(ts_us), workflow_name, run_id, step_id, model, provider,
        served_model, prompt_tokens, completion_tokens, prompt_tokens + completion_tokens,
        cached_tokens, cache_write_tokens, reasoning_tokens, CAST(cost AS DECIMAL(18, 9)),
        price_source, latency_ms, CAST(ttft_ms AS DOUBLE), success, CAST(error AS VARCHAR),
        CAST(error_class AS VARCHAR), CAST(route AS VARCHAR), stream, dry_run
    FROM batch"""
_TEXT = ("workflow_name", "run_id", "step_id", "model", "provider", "served_model",
         "price_source", "error", "error_class", "route")
_INTS = ("prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens",
         "reasoning_tokens")
_BOOLS = ("success", "stream", "dry_run")
# What travels from the request path to the store: a CallRecord's fields as a plain tuple,
# the cost as text (pickling a Decimal costs ~2.6 µs, its text ~0.2 µs).
_FIELDS = ("id", "ts", "cost_usd", "latency_ms", "ttft_ms", *_TEXT, *_INTS, *_BOOLS)
_rest_of = operator.attrgetter(*_FIELDS[3:])


def _fields_of(r: CallRecord) -> tuple[Any, ...]:
    return (r.id, r.ts, None if r.cost_usd is None else str(r.cost_usd), *_rest_of(r))


def _columns(rows: list[tuple[Any, ...]], next_id: Callable[[], str]) -> dict[str, Any]:
    """Rows of `_FIELDS` as the columns `_INSERT` reads."""
    c = dict(zip(_FIELDS, zip(*rows, strict=True), strict=True))
    cols: dict[str, Any] = {
        "id": np.array([i or next_id() for i in c["id"]], dtype=object),
        "ts_us": (np.array(c["ts"], dtype=np.float64) * 1_000_000).astype(np.int64),
        "cost": np.array(c["cost_usd"], dtype=object),  # text or None
        "latency_ms": np.array(c["latency_ms"], dtype=np.float64),
        "ttft_ms": np.array(c["ttft_ms"], dtype=object),
    }
    for name in _TEXT:
        cols[name] = np.array(c[name], dtype=object)
    for name in _INTS:
        cols[name] = np.array(c[name], dtype=np.int64)
    for name in _BOOLS:
        cols[name] = np.array(c[name], dtype=np.bool_)
    return cols


def _segment_rows(t: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Rows of `_FIELDS` read back from a Parquet segment."""
    def plain(values: Any) -> list[Any]:
        return [None if v is None or v != v else v for v in values.tolist()]

    c = {name: plain(t[name]) for name in (*_TEXT, *_INTS, *_BOOLS, "id", "latency_ms",
                                            "ttft_ms")}
    c["ts"] = (t["ts"].astype("datetime64[us]").astype(np.int64) / 1_000_000).tolist()
    c["cost_usd"] = t["cost_text"].tolist()  # exact, as text
    return list(zip(*(c[name] for name in _FIELDS), strict=True))


class _Store:
    """The open ledger file: the only code that writes to it or reads from it."""

    def __init__(self, path: Path) -> None:
        self.con = connect(path)
        self.lock = threading.Lock()  # writer thread and readers share the connection
        self._prefix = uuid.uuid4().hex[:16] + "-"  # row ids: this store + a sequence
        self._seq = 0

    def _next_id(self) -> str:
        self._seq += 1
        return f"{self._prefix}{self._seq:x}"

    def insert_rows(self, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        columns = _columns(rows, self._next_id)
        with self.lock:
            self.con.register("batch", columns)
            try:
                self.con.execute(_INSERT)
            finally:
                self.con.unregister("batch")

    def select(self, sql: str, params: Sequence[Any] = ()
               ) -> tuple[list[str], list[tuple[Any, ...]]]:
        with self.lock:
            return run_select(self.con, sql, params)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.lock:
            cur = self.con.cursor()
            try:
                return cur.execute(sql, list(params)).fetchall()
            finally:
                cur.close()

    def insert_run(self, row: dict[str, Any]) -> None:
        self.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     [row["id"], row["workflow_name"], row["inputs_hash"], row["status"],
                      row["started_at"], row["finished_at"], row["latency_ms"],
                      row["dry_run"], json.dumps(row["record"], default=str)])

    def ingest(self, inbox: Path) -> None:
        """Take in what other processes left in the inbox (run records and row segments)."""
        for run_file in sorted(inbox.glob("run-*.json")):
            try:
                self.insert_run(json.loads(run_file.read_text()))
            except Exception:
                log.exception("ledger: run record %s left in place", run_file)
                continue
            run_file.unlink(missing_ok=True)
        files = sorted(inbox.glob("*.parquet"))
        if not files:
            return
        # The ledger itself has file access disabled: segments are read by a separate,
        # in-memory database.
        mem = duckdb.connect()
        try:
            for f in files:
                try:
                    got = mem.execute(
                        f"SELECT {', '.join(REQUEST_COLUMNS)}, "
                        "CAST(cost_usd AS VARCHAR) AS cost_text FROM read_parquet(?)",
                        [str(f)]).fetchnumpy()
                    self.insert_rows(_segment_rows(got))
                except duckdb.Error:
                    log.exception("ledger: segment %s left in place", f)
                    continue
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
        finally:
            mem.close()

    def close(self) -> None:
        with self.lock:
            self.con.close()


class _ProcessStore:
    """A `_Store` in a child process, so turning rows into columns and inserting them never
    competes with the server's event loop for the GIL. Calls are request/response over a
    pipe; a call's exception is raised again here with its type."""

    def __init__(self, path: Path) -> None:
        ctx = mp.get_context("spawn")  # never fork a process that runs threads and a loop
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_store_process, args=(child, str(path)),
                                 name="flowc-ledger", daemon=True)
        self._proc.start()
        child.close()
        self._lock = threading.Lock()
        status, detail = self._conn.recv()
        if status != "ready":
            self._proc.join(10)
            raise duckdb.IOException(detail)

    def _call(self, *message: Any) -> Any:
        with self._lock:
            self._conn.send(message)
            reply = self._conn.recv()
        if reply[0] == "ok":
            return reply[1]
        _, module, name, text = reply
        if name == "SQLRefused":
            raise SQLRefused(text)
        if module.startswith(("duckdb", "_duckdb")):
            raise getattr(duckdb, name, duckdb.Error)(text)
        raise RuntimeError(f"{name}: {text}")

    def insert_rows(self, rows: list[tuple[Any, ...]]) -> None:
        """Sent without waiting: the child inserts while this process goes on (it logs a
        batch it cannot write). Later calls are answered after it, in order."""
        if rows:
            with self._lock:
                self._conn.send(("rows", rows))

    def select(self, sql: str, params: Sequence[Any] = ()
               ) -> tuple[list[str], list[tuple[Any, ...]]]:
        return self._call("select", sql, list(params))

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._call("execute", sql, list(params))

    def insert_run(self, row: dict[str, Any]) -> None:
        self._call("run", row)

    def ingest(self, inbox: Path) -> None:
        self._call("ingest", str(inbox))

    def close(self) -> None:
        with contextlib.suppress(EOFError, OSError):
            self._call("close")
        self._proc.join(30)


def _store_process(conn: Any, path: str) -> None:
    """The child's loop: one `_Store`, one request at a time, until `close` or EOF."""
    try:
        store = _Store(Path(path))
    except Exception as exc:
        conn.send(("locked" if is_locked_error(exc) else "error", str(exc)))
        return
    conn.send(("ready", None))
    handlers: dict[str, Callable[..., Any]] = {
        "rows": store.insert_rows, "select": store.select, "execute": store.execute,
        "run": store.insert_run, "ingest": lambda inbox: store.ingest(Path(inbox))}
    try:
        while True:
            try:
                op, *args = conn.recv()
            except EOFError:  # the server is gone: what was written stays written
                break
            if op == "close":
                break
            try:
                result = handlers[op](*args)
            except Exception as exc:
                if op == "rows":  # nobody waits for an answer to rows
                    log.exception("ledger: could not write %d rows", len(args[0]))
                    continue
                conn.send(("err", type(exc).__module__, type(exc).__name__, str(exc)))
                continue
            if op != "rows":
                conn.send(("ok", result))
    finally:
        store.close()
        with contextlib.suppress(OSError):
            conn.send(("ok", None))


class Ledger:
    """Records calls without blocking; see the module docstring for the design.

    ``in_process=False`` (the server's choice) keeps the file in a child process."""

    def __init__(self, path: str | Path, flush_interval: float = 1.0, *,
                 in_process: bool = True) -> None:
        self.path = Path(path)
        self.inbox = self.path.with_name(self.path.name + ".inbox")
        self.flush_interval = flush_interval
        # deque.append is atomic: the request path only appends; the writer wakes once per
        # interval (or when a batch is full), never once per row.
        self._pending: collections.deque[CallRecord] = collections.deque()
        self._wake = threading.Event()
        self._flushed = threading.Condition()
        self._generation = 0  # flushes completed
        self._closing = False
        self._store: _Store | _ProcessStore | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._store = _Store(self.path) if in_process else _ProcessStore(self.path)
        except duckdb.IOException as exc:
            if not is_locked_error(exc):
                raise
            log.info("ledger %s is held by another process: writing segments to %s",
                     self.path, self.inbox)
        self.inbox.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="flowc-ledger", daemon=True)
        self._closed = False
        self._thread.start()

    @property
    def owner(self) -> bool:
        return self._store is not None

    def record(self, call: CallRecord) -> None:
        """Queue one row (thread-safe, never blocks; converted to a row by the writer)."""
        self._pending.append(call)
        if len(self._pending) >= _BATCH:
            self._wake.set()

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
        """Store a run record (see runtime/runs.py); written at once, or to the inbox when
        another process holds the ledger."""
        if self._store is not None:
            try:
                self._store.insert_run(row)
            except Exception:
                log.exception("ledger: could not store run %s", row.get("id"))
            return
        tmp = self.inbox / f".run-{row['id']}.tmp"
        tmp.write_text(json.dumps(row, default=str))
        tmp.rename(self.inbox / f"run-{row['id']}.json")

    def flush(self) -> None:
        """Block until every row queued so far is written (for tests and shutdown)."""
        with self._flushed:
            target = self._generation + 1
            self._wake.set()
            self._flushed.wait_for(lambda: self._generation >= target + 1 or self._closed,
                                   timeout=60)

    # -- reading (owner only) --------------------------------------------------------------
    def select(self, sql: str, params: Sequence[Any] = ()
               ) -> tuple[list[str], list[tuple[Any, ...]]]:
        if self._store is None:
            raise RuntimeError("this process does not hold the ledger")
        return self._store.select(sql, params)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Trusted statements from flowc itself (workflows, runs)."""
        if self._store is None:
            raise RuntimeError("this process does not hold the ledger")
        return self._store.execute(sql, params)

    # -- the writer thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            stopping = self._closing
            # Chunks, with a GIL hand-off between them: converting one large batch in this
            # process holds the GIL long enough to stall the server's event loop.
            chunk = _CHUNK if isinstance(self._store, _Store) else _CHUNK_TO_PROCESS
            while self._pending:
                batch = [self._pending.popleft()
                         for _ in range(min(chunk, len(self._pending)))]
                self._write([_fields_of(r) for r in batch])
                time.sleep(0)
            if self._store is not None:
                try:
                    self._store.ingest(self.inbox)
                except Exception:
                    log.exception("ledger: could not ingest %s", self.inbox)
            with self._flushed:
                self._generation += 1
                self._flushed.notify_all()
            if stopping and not self._pending:
                return

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        try:
            if self._store is not None:
                self._store.insert_rows(rows)
            else:
                self._write_segment(rows)
        except Exception:  # the writer must survive a bad batch; the rows are logged
            log.exception("ledger: could not write %d rows", len(rows))

    def _write_segment(self, rows: list[tuple[Any, ...]]) -> None:
        """A Parquet file the owner will ingest (written to a temp name, then renamed)."""
        name = f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = self.inbox / f".{name}.tmp"
        final = self.inbox / f"{name}.parquet"
        mem = duckdb.connect()
        try:
            migrate(mem)
            seq = iter(range(1, len(rows) + 1))
            prefix = name + "-"
            mem.register("batch", _columns(rows, lambda: f"{prefix}{next(seq):x}"))
            mem.execute(_INSERT)
            mem.execute(f"COPY requests TO '{tmp}' (FORMAT parquet)")
        finally:
            mem.close()
        tmp.rename(final)

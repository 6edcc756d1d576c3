"""The cost ledger: one row per model call, in an embedded DuckDB file.

Facts that shape it (measured here, see ../shared notes in the repository's history):
while one process holds a DuckDB file read-write no other process can open it at all, and
per-row inserts manage ~1,000 rows/s while an appender fed by one writer thread reaches
~190,000 with the event loop undisturbed. So:

- `record()` only puts the row on a queue: it never blocks the request path.
- One writer thread appends batches every `flush_interval` (1 s) or 1,000 rows; a graceful
  close drains the queue, a hard kill loses at most one interval.
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
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from runtime.ledger.schema import REQUEST_COLUMNS, migrate

log = logging.getLogger("flowc.ledger")
_BATCH = 1000
_CHUNK = 500
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

    def row(self, default_id: str = "") -> tuple[Any, ...]:
        """The row in REQUEST_COLUMNS order (built on the writer thread, not the caller's).
        The cost goes in as text: DuckDB reads it exactly, and ~1.7x faster than a
        Decimal."""
        return (
            self.id or default_id or uuid.uuid4().hex,
            datetime.fromtimestamp(self.ts, UTC).replace(tzinfo=None),
            self.workflow_name, self.run_id, self.step_id, self.model, self.provider,
            self.served_model, self.prompt_tokens, self.completion_tokens,
            self.prompt_tokens + self.completion_tokens, self.cached_tokens,
            self.cache_write_tokens, self.reasoning_tokens,
            None if self.cost_usd is None else str(self.cost_usd), self.price_source,
            self.latency_ms, self.ttft_ms, self.success, self.error, self.error_class,
            self.route, self.stream, self.dry_run,
        )


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


def _to_columns(batch: list[CallRecord], ids: list[str]) -> dict[str, Any]:
    cols: dict[str, Any] = {
        "id": np.array(ids, dtype=object),
        "ts_us": np.fromiter((int(r.ts * 1_000_000) for r in batch), np.int64, len(batch)),
        "cost": np.array([None if r.cost_usd is None else str(r.cost_usd) for r in batch],
                         dtype=object),
        "latency_ms": np.fromiter((r.latency_ms for r in batch), np.float64, len(batch)),
        "ttft_ms": np.array([r.ttft_ms for r in batch], dtype=object),
    }
    for name in _TEXT:
        cols[name] = np.array([getattr(r, name) for r in batch], dtype=object)
    for name in _INTS:
        cols[name] = np.fromiter((getattr(r, name) for r in batch), np.int64, len(batch))
    for name in ("success", "stream", "dry_run"):
        cols[name] = np.fromiter((getattr(r, name) for r in batch), np.bool_, len(batch))
    return cols


def _from_table(t: dict[str, Any]) -> dict[str, Any]:
    """Columns read back from a segment, in the shape `_insert` takes."""
    cols = {name: t[name] for name in (*_TEXT, *_INTS, "id", "latency_ms", "success",
                                       "stream", "dry_run")}
    cols["ts_us"] = t["ts"].astype("datetime64[us]").astype(np.int64)
    cols["cost"] = np.array(t["cost_text"].tolist(), dtype=object)  # exact, as text
    cols["ttft_ms"] = np.array([None if v != v else v for v in t["ttft_ms"].tolist()],
                               dtype=object)
    for name in _TEXT:
        cols[name] = np.array([None if v is None or v != v else v
                               for v in t[name].tolist()], dtype=object)
    return cols


def _insert(con: duckdb.DuckDBPyConnection, columns: dict[str, Any]) -> None:
    con.register("batch", columns)
    try:
        con.execute(_INSERT)
    finally:
        con.unregister("batch")


class Ledger:
    """Records calls without blocking; see the module docstring for the design."""

    def __init__(self, path: str | Path, flush_interval: float = 1.0) -> None:
        self.path = Path(path)
        self.inbox = self.path.with_name(self.path.name + ".inbox")
        self.flush_interval = flush_interval
        # deque.append is atomic: the request path only appends; the writer wakes once per
        # interval (or when a batch is full), never once per row.
        self._pending: collections.deque[CallRecord] = collections.deque()
        self._wake = threading.Event()
        self._flushed = threading.Condition()
        self._generation = 0  # flushes completed
        self._id_prefix = uuid.uuid4().hex[:16] + "-"  # row ids: this writer + a sequence
        self._seq = 0
        self._closing = False
        self._con: duckdb.DuckDBPyConnection | None = None
        self._lock = threading.Lock()  # guards the connection between writer and readers
        try:
            self._con = connect(self.path)
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
        return self._con is not None

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
        if self._con is not None:
            with self._lock:
                self._con.close()

    def record_run(self, row: dict[str, Any]) -> None:
        """Store a run record (see runtime/runs.py); written at once, or to the inbox when
        another process holds the ledger."""
        if self._con is not None:
            try:
                self._insert_run(row)
            except Exception:
                log.exception("ledger: could not store run %s", row.get("id"))
            return
        tmp = self.inbox / f".run-{row['id']}.tmp"
        tmp.write_text(json.dumps(row, default=str))
        tmp.rename(self.inbox / f"run-{row['id']}.json")

    def _insert_run(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._con.execute(  # type: ignore[union-attr]
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [row["id"], row["workflow_name"], row["inputs_hash"], row["status"],
                 row["started_at"], row["finished_at"], row["latency_ms"], row["dry_run"],
                 json.dumps(row["record"], default=str)])

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
        if self._con is None:
            raise RuntimeError("this process does not hold the ledger")
        with self._lock:
            return run_select(self._con, sql, params)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Trusted statements from flowc itself (workflows, runs)."""
        if self._con is None:
            raise RuntimeError("this process does not hold the ledger")
        with self._lock:
            cur = self._con.cursor()
            try:
                return cur.execute(sql, list(params)).fetchall()
            finally:
                cur.close()

    # -- the writer thread -----------------------------------------------------------------
    def _columns(self, batch: list[CallRecord]) -> dict[str, Any]:
        ids = []
        for r in batch:
            self._seq += 1
            ids.append(r.id or f"{self._id_prefix}{self._seq:x}")
        return _to_columns(batch, ids)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            stopping = self._closing
            # Chunks, with a GIL hand-off between them: converting one large batch holds the
            # GIL long enough to stall the server's event loop.
            while self._pending:
                batch = [self._pending.popleft()
                         for _ in range(min(_CHUNK, len(self._pending)))]
                self._write(self._columns(batch))
                time.sleep(0)
            if self.owner:
                self._ingest_inbox()
            with self._flushed:
                self._generation += 1
                self._flushed.notify_all()
            if stopping and not self._pending:
                return

    def _write(self, columns: dict[str, Any]) -> None:
        if not len(columns["id"]):
            return
        try:
            if self._con is not None:
                with self._lock:
                    _insert(self._con, columns)
            else:
                self._write_segment(columns)
        except Exception:  # the writer must survive a bad batch; the rows are logged
            log.exception("ledger: could not write %d rows", len(columns["id"]))

    def _write_segment(self, columns: dict[str, Any]) -> None:
        """A Parquet file the owner will ingest (written to a temp name, then renamed)."""
        name = f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = self.inbox / f".{name}.tmp"
        final = self.inbox / f"{name}.parquet"
        mem = duckdb.connect()
        try:
            migrate(mem)
            _insert(mem, columns)
            mem.execute(f"COPY requests TO '{tmp}' (FORMAT parquet)")
        finally:
            mem.close()
        tmp.rename(final)

    def _ingest_inbox(self) -> None:
        for run_file in sorted(self.inbox.glob("run-*.json")):
            try:
                self._insert_run(json.loads(run_file.read_text()))
            except Exception:
                log.exception("ledger: run record %s left in place", run_file)
                continue
            run_file.unlink(missing_ok=True)
        files = sorted(self.inbox.glob("*.parquet"))
        if not files:
            return
        # The ledger itself has file access disabled: read segments with a separate,
        # in-memory database, then append the rows.
        mem = duckdb.connect()
        try:
            for f in files:
                try:
                    got = mem.execute(
                        f"SELECT {', '.join(REQUEST_COLUMNS)}, "
                        "CAST(cost_usd AS VARCHAR) AS cost_text FROM read_parquet(?)",
                        [str(f)]).fetchnumpy()
                except duckdb.Error:
                    log.exception("ledger: unreadable segment %s left in place", f)
                    continue
                self._write(_from_table(got))
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
        finally:
            mem.close()

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
- User SQL is read-only and cannot touch files: the database is opened with external access
  disabled and the configuration locked, and only SELECT statements are accepted.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import multiprocessing as mp
import operator
import os
import pickle
import queue
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
_FRAME = 500  # rows sealed into one frame (~0.3 ms of the recording thread's time)
_WAKE_FRAMES = 4  # sealed frames that wake the writer (each wake is a GIL hand-off)
_CHILD_ROWS = 20_000  # rows the child gathers from the pipe into one insert, at most
_GATHER = 0.05  # seconds the child waits for more rows before inserting
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
        CAST(error_class AS VARCHAR), CAST(route AS VARCHAR), stream, dry_run,
        cache_write_1h_tokens,
        coalesce(CAST(status AS VARCHAR), CASE WHEN success THEN 'ok' ELSE 'error' END),
        usage_estimated, false
    FROM batch"""
_TEXT = ("workflow_name", "run_id", "step_id", "model", "provider", "served_model",
         "price_source", "error", "error_class", "route", "status")
_INTS = ("prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens",
         "reasoning_tokens", "cache_write_1h_tokens")
_BOOLS = ("success", "stream", "dry_run", "usage_estimated")
# A row waits as the tuple of its record's `_FIELDS` (read by an attrgetter, in C); a frame
# travels as `Columns` (one sequence per name, transposed in C) with the cost as text:
# pickling a Decimal costs ~2.6 µs, its text ~0.1.
_FIELDS = ("id", "ts", "cost_usd", "latency_ms", "ttft_ms", *_TEXT, *_INTS, *_BOOLS)
_fields_of = operator.attrgetter(*_FIELDS)
Columns = dict[str, Sequence[Any]]


def _text(cost: Decimal | None) -> str | None:
    return None if cost is None else str(cost)


def _columns_of(rows: Sequence[tuple[Any, ...]]) -> Columns:
    """Rows of `_FIELDS` (as `record()` queues them) as `Columns`."""
    cols: Columns = dict(zip(_FIELDS, zip(*rows, strict=True), strict=True))
    cols["cost_usd"] = tuple(map(_text, cols["cost_usd"]))
    return cols


def _concat(batches: list[Columns]) -> Columns:
    if len(batches) == 1:
        return batches[0]
    return {name: list(itertools.chain.from_iterable(b[name] for b in batches))
            for name in _FIELDS}


def _length(cols: Columns) -> int:
    return len(cols["ts"])


def _frame(rows: list[tuple[Any, ...]]) -> bytes:
    """Rows of `_FIELDS`, sealed: `Columns`, pickled (repeated strings are stored once)."""
    return pickle.dumps(_columns_of(rows), protocol=pickle.HIGHEST_PROTOCOL)


def _unframe(frames: list[bytes]) -> Columns:
    return _concat([pickle.loads(f) for f in frames])


def _columns(c: Columns, new_ids: Callable[[int], list[str]]) -> dict[str, Any]:
    """`Columns` as the numpy arrays `_INSERT` reads; rows without an id get new ones."""
    ids = c["id"]
    if not any(ids):  # the usual case: records from this process carry no id
        ids = new_ids(len(ids))
    elif not all(ids):
        fresh = iter(new_ids(len(ids)))
        ids = [i or next(fresh) for i in ids]
    cols: dict[str, Any] = {
        "id": np.array(ids, dtype=object),
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


def _segment_column(name: str, have: set[str]) -> str:
    """How a segment's column is read: one from an older flowc may lack it, or hold NULL
    token counts (read as 0)."""
    if name in _INTS:
        return f"coalesce({name}, 0) AS {name}" if name in have else f"0 AS {name}"
    if name in have:
        return name
    if name in _BOOLS:
        return f"false AS {name}"
    return f"NULL AS {name}"


def _segment_columns(t: dict[str, Any]) -> Columns:
    """`Columns` read back from a Parquet segment."""
    def plain(values: Any) -> list[Any]:
        return [None if v is None or v != v else v for v in values.tolist()]

    c: Columns = {name: plain(t[name]) for name in (*_TEXT, *_INTS, *_BOOLS, "id",
                                                     "latency_ms", "ttft_ms")}
    c["ts"] = (t["ts"].astype("datetime64[us]").astype(np.int64) / 1_000_000).tolist()
    c["cost_usd"] = t["cost_text"].tolist()  # exact, as text
    return c


class _Store:
    """The open ledger file: the only code that writes to it or reads from it."""

    def __init__(self, path: Path) -> None:
        self.con = connect(path)
        self.lock = threading.Lock()  # writer thread and readers share the connection
        self._prefix = uuid.uuid4().hex[:16] + "-"  # row ids: this store + a sequence
        self._seq = 0

    def _new_ids(self, n: int) -> list[str]:
        start, self._seq = self._seq + 1, self._seq + n
        return [f"{self._prefix}{i:x}" for i in range(start, start + n)]

    def insert_frames(self, frames: list[bytes]) -> None:
        self.insert_rows(_unframe(frames))

    def insert_rows(self, rows: Columns) -> None:
        if not _length(rows):
            return
        columns = _columns(rows, self._new_ids)
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
                    got = mem.execute(
                        f"SELECT {columns}, CAST(cost_usd AS VARCHAR) AS cost_text "
                        "FROM read_parquet(?)", [str(f)]).fetchnumpy()
                    self.insert_rows(_segment_columns(got))
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

    def insert_frames(self, frames: list[bytes]) -> None:
        """Sent without waiting: the child inserts while this process goes on (it logs a
        batch it cannot write). Later calls are answered after it, in order."""
        with self._lock:
            self._conn.send(("rows", frames))

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
    # A thread keeps reading the pipe while an insert runs: a full pipe would block the
    # server's writer in send() (measured: ~2.5 ms a send, and a backlog of 100k+ rows at
    # 100k rows/s), and every blocked send costs it a GIL hand-off in the server.
    received: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()

    def read() -> None:
        while True:
            try:
                received.put(conn.recv())
            except (EOFError, OSError):  # the server is gone: what was written stays
                received.put(("eof",))
                return

    threading.Thread(target=read, name="flowc-ledger-reader", daemon=True).start()
    handlers: dict[str, Callable[..., Any]] = {
        "select": store.select, "execute": store.execute,
        "run": store.insert_run, "ingest": lambda inbox: store.ingest(Path(inbox))}
    message: tuple[Any, ...] | None = None
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
            if op in ("close", "eof"):
                break
            try:
                result = handlers[op](*args)
            except Exception as exc:
                conn.send(("err", type(exc).__module__, type(exc).__name__, str(exc)))
                continue
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
        # Rows wait in `_rows` until `_FRAME` of them are sealed into a frame by the thread
        # that recorded the last one; the writer thread sends sealed frames (and seals what
        # is left once per interval). See `record()` for why.
        self._rows: list[tuple[Any, ...]] = []
        self._rows_lock = threading.Lock()
        self._frames: collections.deque[bytes] = collections.deque()
        self._wake = threading.Event()
        self._flushed = threading.Condition()
        self._started = self._generation = 0  # writer passes started and completed
        self._sync = False  # a flush() waits for the store to confirm what it was sent
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
        """Queue one row (thread-safe, never blocks).

        Every `_FRAME`-th call seals the waiting rows into a frame (~0.3 ms), here rather
        than on the writer thread: a thread that needs the GIL back from a busy event loop
        waits up to the switch interval (5 ms) each time, so a writer that converted rows
        itself fell behind at ~60k rows/s; one that only sends sealed frames takes all of
        them in one hand-off. Rows wait as tuples of their fields, not as records: plain
        tuples leave the garbage collector's lists, while a backlog of records was walked
        by every full collection (50-200 ms pauses in a 500k-row burst)."""
        row = _fields_of(call)
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
            self._frames.append(_frame(rows))
        except Exception:  # never fail the request that happened to record the 500th row
            log.exception("ledger: could not seal %d rows", len(rows))

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
        another process holds the ledger. The run's calls are written first: a run that
        can be read has all its rows on the books (this waits for one writer pass)."""
        self.flush()
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
        """Block until every row queued so far is written (runs, tests, shutdown)."""
        with self._flushed:
            target = self._started + 1  # the next pass to start sees everything queued
            self._sync = True
            self._wake.set()
            self._flushed.wait_for(lambda: self._generation >= target or self._closed,
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
        next_sync = 0.0
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            stopping = self._closing
            with self._flushed:
                self._started += 1
                asked, self._sync = self._sync, False
            # The inbox is taken in once per interval (or when a flush asks), not on every
            # full batch: each take-in is a round trip to the store that also waits for the
            # rows sent before it, so that is also what `flush()` waits on.
            sync = asked or stopping or time.monotonic() >= next_sync
            if sync:
                next_sync = time.monotonic() + self.flush_interval
            with self._rows_lock:
                rows, self._rows = self._rows, []
            if rows:
                self._seal(rows)
            frames = [self._frames.popleft() for _ in range(len(self._frames))]
            if frames:
                self._write(frames)
            if sync and self._store is not None:
                try:
                    self._store.ingest(self.inbox)
                except Exception:
                    log.exception("ledger: could not ingest %s", self.inbox)
            with self._flushed:
                self._generation += 1
                self._flushed.notify_all()
            if stopping and not self._frames and not self._rows:
                return

    def _write(self, frames: list[bytes]) -> None:
        try:
            if self._store is not None:
                self._store.insert_frames(frames)
            else:
                self._write_segment(_unframe(frames))
        except Exception:  # the writer must survive a bad batch; the rows are logged
            log.exception("ledger: could not write %d frames of rows", len(frames))

    def _write_segment(self, rows: Columns) -> None:
        """A Parquet file the owner will ingest (written to a temp name, then renamed)."""
        name = f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = self.inbox / f".{name}.tmp"
        final = self.inbox / f"{name}.parquet"
        mem = duckdb.connect()
        try:
            migrate(mem)
            mem.register("batch", _columns(
                rows, lambda n: [f"{name}-{i:x}" for i in range(1, n + 1)]))
            mem.execute(_INSERT)
            mem.execute(f"COPY requests TO '{tmp}' (FORMAT parquet)")
        finally:
            mem.close()
        tmp.rename(final)

"""The supervisor's side of `flowc serve --workers N`: the one process that owns the ledger
(its DuckDB file in a child process, as `flowc serve` keeps it) and the one set of budget
counters and rate-limit windows, answering every worker over a Unix socket (link.py); it
also keeps the Responses API's conversations, so `previous_response_id` finds them on any
worker.

Each worker's connection has a thread: rows go straight into the owner's `Ledger` (the
frames and the writer are its own), budget and rate-limit calls are answered on the
thread under one lock (they are a few dict operations), and anything that waits on the
ledger file (queries, statements, runs, a flush, a key change) runs on a small pool so a
long query never holds up that worker's rows. A key change or a pipeline registered is
answered once every other worker confirms it has it live, awaited on a thread of its own
(a worker confirms a pipeline once it has read it, through the pool).

Budgets: workers lease slices of a budget's headroom (held here as reserved, as
`budget_leases` are in Postgres; runtime/pg/access.py) and settle every tick. A slice is
at most half an even share of the headroom left among the workers, so the slices never
pass the limit. A worker that goes away without settling (killed) may have spent what it
held: its leases count as spent (a budget is a hard limit); the ledger's rows, summed
again at the next start, are the exact spend.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_FLOOR, Decimal
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any

from flowc.config import ProjectConfig
from runtime.access.budgets import ZERO, Alert, Budgets, Counter, Scope
from runtime.access.gate import Gate
from runtime.access.keys import Key
from runtime.access.limits import RateLimited
from runtime.access.store import LedgerAccessStore
from runtime.gateway.responses_store import ResponseStore
from runtime.ledger.store import Ledger, LedgerUnavailable
from runtime.pg.access import CENT

log = logging.getLogger("flowc.workers")
_ACK_WAIT = 5.0  # seconds a key change waits for every worker to have it live
_CALLS = 4  # calls that wait on the ledger file, at once
_READ_TO_END = 10.0  # seconds `close` waits for the workers' last rows to be read
_WORKFLOW_WRITE = re.compile(r"\s*INSERT\s+INTO\s+workflows\b", re.I)  # Registry.register


class OwnerLedger(Ledger):
    """The supervisor's ledger: also takes rows already flattened by a worker (`add_row`)
    and frames a worker wrote while it could not reach this process."""

    def add_frames(self, frames: list[bytes]) -> None:
        """Frames a worker wrote while it could not reach this process, sent on."""
        self._write(frames)


@dataclass(frozen=True, slots=True)
class _Announce:
    """A call's answer, sent once every other worker has ``what`` live (a key, a pipeline
    registered over HTTP): what is pushed to them."""

    value: Any
    what: tuple[Any, ...]


class _Worker:
    """One worker's connection, and what it holds leased of each budget."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None  # reads its messages
        self.leases: dict[Scope, Decimal] = {}

    def send(self, message: tuple[Any, ...]) -> None:
        with self.lock, contextlib.suppress(OSError, ValueError):
            self.conn.send(message)


class Hub:
    def __init__(self, config: ProjectConfig, project_dir: Path, address: str, authkey: bytes,
                 admin_key: str | None) -> None:
        self.ledger = OwnerLedger(project_dir / config.ledger.path,
                                  config.ledger.flush_interval, in_process=False)
        self.store = LedgerAccessStore(self.ledger)
        # The budgets' spend is read from the ledger before the lock is taken (`_spends`):
        # a query may wait on the writer for up to a minute, and every worker's admission,
        # lease and settlement waits on the lock (and its rows behind them).
        self.gate = Gate(config, self.store, admin_key, self._alerted,
                         budgets=Budgets(self.store.spend, config.alerts.thresholds,
                                         self._alerted))
        self.lock = threading.Lock()  # the gate's counters and windows
        self._keys_lock = threading.Lock()  # key changes, one at a time (see `_key`)
        # The Responses API's kept conversations, as JSON, for every worker (link.py's
        # `SupervisedResponses`): bounded as one process's store is.
        self.responses = ResponseStore()
        self._listener = Listener(address, family="AF_UNIX", authkey=authkey)
        self._workers: set[_Worker] = set()
        self._pool = ThreadPoolExecutor(_CALLS, thread_name_prefix="flowc-hub")
        self._ids = itertools.count(1)  # reservations and acknowledgements
        self._acks: dict[int, Future[None]] = {}
        self._alerts: list[Alert] = []
        self._closing = False
        self._load()
        threading.Thread(target=self._accept, name="flowc-hub-accept", daemon=True).start()

    def _load(self) -> None:
        try:
            self.gate.load()
        except LedgerUnavailable as exc:
            log.warning("keys and budgets wait for the ledger: %s", exc)
            threading.Thread(target=self._load_later, daemon=True).start()

    def _load_later(self) -> None:
        while not self._closing:
            time.sleep(1.0)
            try:
                self._load_keys()
            except LedgerUnavailable:
                continue
            return

    def _load_keys(self) -> None:
        """Keys and budgets read from the ledger outside the lock, put live under it."""
        keys = self.store.load_keys()
        known = self._spends(lambda b: Gate(self.gate.config, self.store, None,
                                            budgets=b).load(keys))
        with self.lock, self._using(known):
            # A key changed meanwhile (by a worker, through the ledger) is newer.
            self.gate.load([k for k in keys if k.id not in self.gate.keys])

    def _spends(self, fill: Callable[[Budgets], None]) -> dict[tuple[Scope, datetime], Decimal]:
        """The spend each budget ``fill`` sets up asks for, summed from the ledger now,
        outside the lock."""
        found: dict[tuple[Scope, datetime], Decimal] = {}

        def spend(scope: Scope, since: datetime) -> Decimal:
            found[(scope, since)] = got = self.store.spend(scope, since)
            return got

        fill(Budgets(spend))
        return found

    @contextlib.contextmanager
    def _using(self, known: dict[tuple[Scope, datetime], Decimal]) -> Iterator[None]:
        """Under the lock: the budgets set up meanwhile take their spend from ``known``
        (one not read beforehand, a period that began since, is read then)."""
        self.gate.budgets.known = known
        try:
            yield
        finally:
            self.gate.budgets.known = {}

    def _alerted(self, alert: Alert) -> None:
        self._alerts.append(alert)  # sent to the worker whose charge crossed it

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn = self._listener.accept()
            except (OSError, EOFError):
                if self._closing:
                    return
                continue
            except Exception:  # a client that failed the handshake
                log.warning("workers: refused a connection that failed the handshake")
                continue
            worker = _Worker(conn)
            worker.thread = threading.Thread(target=self._serve, args=(worker,),
                                             name="flowc-hub-worker", daemon=True)
            self._workers.add(worker)
            worker.thread.start()

    def _serve(self, w: _Worker) -> None:
        try:
            while True:
                try:
                    message = w.conn.recv()
                except (EOFError, OSError):
                    return
                except Exception as exc:  # unreadable: nothing after it can be trusted
                    log.error("workers: a message from a worker could not be read (%s: %s); "
                              "its connection is closed", type(exc).__name__, exc)
                    return
                try:
                    self._handle(w, message)
                except Exception:
                    log.exception("workers: could not handle %s", message[0])
        finally:
            self._workers.discard(w)
            with self.lock:  # gone without settling: what it held may have been spent
                for scope, held in w.leases.items():
                    c = self.gate.budgets.counters.get(scope)
                    if c is not None:
                        c.reserved -= held
                        self.gate.budgets.charge([c], held)
                w.leases.clear()
            with contextlib.suppress(OSError):
                w.conn.close()

    def _handle(self, w: _Worker, message: tuple[Any, ...]) -> None:
        op = message[0]
        if op == "row":
            self.ledger.add_row(message[1])
        elif op == "batch":  # the rows a worker's event loop recorded in one iteration
            for row in message[1]:
                self.ledger.add_row(row)
        elif op == "rows":
            self.ledger.add_frames(message[1])
        elif op == "tokens":
            with self.lock:
                win = self.gate._windows.get(Scope(message[1], message[2]))
                if win is not None:
                    win.add_tokens(time.monotonic(), message[3])
        elif op == "ack":
            fut = self._acks.pop(message[1], None)
            if fut is not None:
                fut.set_result(None)
        elif op == "unslot":  # request slots a worker leased and did not use
            with self.lock:
                win = self.gate._windows.get(Scope(message[1], message[2]))
                if win is not None:
                    win.give_back(message[3], message[4])
        elif op == "response_put":  # a few dict operations, on the connection's thread
            rid, response_id, blob = message[1:]
            self._answer(w, rid, lambda: self.responses.keep(response_id, blob, len(blob)))
        elif op == "response_get":
            rid, response_id = message[1:]
            self._answer(w, rid, lambda: self.responses.get(response_id))
        elif op in ("slots", "lease", "settle"):
            rid, *args = message[1:]
            self._answer(w, rid, lambda: getattr(self, "_" + op)(w, *args))
            if op == "settle":
                self._send_alerts(w)
        else:
            rid, *args = message[1:]
            self._pool.submit(self._answer, w, rid, lambda: self._slow(w, op, args))

    def _answer(self, w: _Worker, rid: int, fn: Any) -> None:
        try:
            value = fn()
        except Exception as exc:
            w.send((rid, "err", type(exc).__module__, type(exc).__name__, str(exc)))
            return
        if not isinstance(value, _Announce):
            w.send((rid, "ok", value))
            return
        # The confirmations are awaited on a thread of their own, never on the pool: a
        # worker confirms a pipeline once it has read it, through the pool.
        waits = self._push(w, value.what)
        threading.Thread(target=self._answer_when_live, args=(w, rid, value, waits),
                         name="flowc-hub-announce", daemon=True).start()

    # -- budgets and rate limits (answered on the connection's thread) ----------------------
    def _slots(self, w: _Worker, items: list[tuple[str, str, int, int, float]]) -> Any:
        """Request slots for a worker's call, on the one set of windows: each item is
        (kind, name, slots wanted, slots handed back, when those were leased). Every
        window is checked, then each leases at least one slot (see `Window.lease`):
        ("limited", message, retry_after, each window's state), or ("ok", per window None
        (not configured) or (slots, when, *its state)); a state is `Window.state`'s."""
        with self.lock:
            now = time.monotonic()
            found = [self.gate._windows.get(Scope(k, n)) for k, n, *_ in items]
            for win, (*_, back, at) in zip(found, items, strict=True):
                if win is not None:
                    win.give_back(at, back)
            try:
                for win in found:
                    if win is not None:
                        win.check(now)
            except RateLimited as exc:
                return ("limited", str(exc), exc.retry_after,
                        [None if win is None else win.state(now) for win in found])
            among = max(len(self._workers), 1)
            return ("ok", [None if win is None else
                           (win.lease(now, want, among), now, *win.state(now))
                           for win, (_, _, want, _, _) in zip(found, items, strict=True)])

    def _counter(self, kind: str, name: str, start: float) -> Counter | None:
        """The budget's counter, if it is in the period the worker counts in."""
        c = self.gate.budgets.counters.get(Scope(kind, name))
        if c is None:
            return None
        self.gate.budgets._roll(c, time.time())
        return c if c.start.timestamp() == start else None

    def _grant(self, w: _Worker, c: Counter, need: Decimal, want: Decimal) -> Decimal | None:
        """`_GRANT` of runtime/pg/access.py, here: at least ``need``, at most ``want`` and
        half an even share of the headroom among the workers; None if not ``need`` left."""
        free = c.limit - c.spent - c.reserved
        if need > free:
            return None
        share = (free / (2 * max(len(self._workers), 1))).quantize(CENT, ROUND_FLOOR)
        granted = min(want, max(need, share))
        c.reserved += granted
        w.leases[c.scope] = w.leases.get(c.scope, ZERO) + granted
        return granted

    def _lease(self, w: _Worker, kind: str, name: str, start: float, need: Decimal,
               want: Decimal) -> Any:
        """(granted or None, the budget's spend, what all workers hold); None: no such
        budget (or period) here."""
        with self.lock:
            c = self._counter(kind, name, start)
            if c is None:
                return None
            return self._grant(w, c, need, want), c.spent, c.reserved

    def _settle(self, w: _Worker, items: list[tuple[str, str, float, Decimal, Decimal,
                                                    Decimal]],
                watched: list[tuple[str, str]]) -> Any:
        """A worker's tick: per budget, ``charged`` becomes spend, ``back`` leaves its
        lease, ``more`` is leased ahead; then every watched budget's (spend, held)."""
        granted: list[Decimal | None] = []
        with self.lock:
            for kind, name, start, charged, back, more in items:
                scope = Scope(kind, name)
                held = w.leases.get(scope, ZERO)
                back = min(back, held)
                if back:
                    w.leases[scope] = held - back
                c = self.gate.budgets.counters.get(scope)
                if c is not None:
                    c.reserved -= back
                c = self._counter(kind, name, start)
                if c is not None and charged:
                    self.gate.budgets.charge([c], charged)
                granted.append(self._grant(w, c, CENT, more)
                               if c is not None and more else None)
            totals = []
            for kind, name in watched:
                c = self.gate.budgets.counters.get(Scope(kind, name))
                totals.append((c.spent, c.reserved) if c is not None else None)
        return granted, totals

    def _send_alerts(self, w: _Worker) -> None:
        with self.lock:
            alerts, self._alerts = self._alerts, []
        for a in alerts:
            w.send((0, "alert", a))

    # -- what waits on the ledger file (on the pool) ----------------------------------------
    def _slow(self, w: _Worker, op: str, args: list[Any]) -> Any:
        if op == "select":
            sql, params, timeout = args
            return self.ledger.select(sql, params, timeout=timeout)
        if op == "execute":
            rows = self.ledger.execute(*args)
            if _WORKFLOW_WRITE.match(args[0]):  # a pipeline registered over HTTP
                return _Announce(rows, ("workflows",))
            return rows
        if op == "run":
            self.ledger.record_run(args[0])
            return None
        if op == "flush":
            self.ledger.flush()
            return None
        if op == "key":
            key, base = args
            if not self._key(key, base):
                return False
            return _Announce(True, ("key", key))
        raise ValueError(f"unknown call {op!r}")

    def _key(self, key: Key, base: Key | None) -> bool:
        """A key changed by one worker, worked out from ``base`` (None: a new key): saved
        and live here (then on every other worker before the change is answered); False,
        and nothing saved, when another worker's change came first (the key here is no
        longer ``base``)."""
        with self._keys_lock:  # a compare and a save with nothing in between
            if base is not None and self.gate.keys.get(key.id) != base:
                return False
            self.store.save_key(key)
            reads = self.gate.reads(key)  # the ledger, before the lock (see `_spends`)
            with self.lock:
                self.gate.put(key, reads)
        return True

    def _push(self, origin: _Worker, what: tuple[Any, ...]) -> list[tuple[int, Future[None]]]:
        """``what`` to every worker but ``origin``; each one's confirmation to come."""
        waits = []
        for w in list(self._workers):
            if w is origin:
                continue
            ack = next(self._ids)
            fut: Future[None] = Future()
            self._acks[ack] = fut
            waits.append((ack, fut))
            w.send((0, what[0], ack, *what[1:]))
        return waits

    def _answer_when_live(self, w: _Worker, rid: int, change: _Announce,
                          waits: list[tuple[int, Future[None]]]) -> None:
        """The change is answered once every other worker says it is live."""
        what = change.what
        deadline = time.monotonic() + _ACK_WAIT
        for ack, fut in waits:
            try:
                fut.result(max(0.0, deadline - time.monotonic()))
            except Exception:  # a worker that died or hangs reads it when it starts
                self._acks.pop(ack, None)
                log.warning("workers: a worker did not confirm a change (%s) in time",
                            what[0])
        w.send((rid, "ok", change.value))

    def workers(self) -> int:
        return len(self._workers)

    def close(self) -> None:
        """After the workers have stopped: write everything, release the ledger file."""
        self._closing = True
        with contextlib.suppress(OSError):
            self._listener.close()
        # A worker that exited may have left rows in its socket: its thread reads them to
        # the end before the ledger writes its last.
        deadline = time.monotonic() + _READ_TO_END
        for w in list(self._workers):
            if w.thread is not None:
                w.thread.join(max(0.0, deadline - time.monotonic()))
        self._pool.shutdown(wait=True)
        self.ledger.close()

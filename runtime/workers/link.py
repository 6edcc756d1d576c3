"""A worker's side of `flowc serve --workers N`: its ledger, keys, budgets and rate limits
all go through one connection to the supervisor, which owns the ledger (hub.py).

- Rows: each row is sent as it is recorded (a pickled tuple, one write on a Unix socket)
  instead of waiting in this process for a frame: what a worker has answered is in the
  socket's buffer or beyond it, so a worker killed with -9 loses no answered row.
- Budgets: every reservation is made on the supervisor's counters (one round trip, only
  for callers with a budget or a rate limit), so the workers together never pass a
  budget; charges and releases are sent without waiting.
- Rate limits: checked and taken on the supervisor's windows, in the same round trip as
  the reservation (exact across workers).
- Keys: a change is saved, then sent to every other worker, which puts it live on its
  event loop before the change is answered (hub.py), so a key made through one worker
  works on all of them at once. A pipeline registered over HTTP is served by every
  worker the same way.

The messages are `_ProcessStore`'s (runtime/ledger/store.py): calls carry an id and are
answered with it, or with the error's module, type and text; pushes from the supervisor
carry id 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC, datetime
from decimal import Decimal
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

import duckdb

from flowc.config import ProjectConfig
from runtime.access.budgets import Alert, BudgetExceeded, Budgets, Counter, Scope
from runtime.access.gate import Gate
from runtime.access.keys import Key
from runtime.access.limits import RateLimited, Window
from runtime.access.store import LedgerAccessStore
from runtime.ledger.store import (
    CallRecord,
    Ledger,
    LedgerUnavailable,
    _fields_of,
    _ProcessStore,
)
from runtime.workflows import Registry

log = logging.getLogger("flowc.workers")
_RETRY = 1.0  # seconds between attempts to reach the supervisor again


class _Pushes:
    """The connection as `_ProcessStore` reads it: what the supervisor pushes (id 0) is
    handed to ``on_push`` on the way, replies pass through."""

    def __init__(self, conn: Connection, on_push: Callable[[tuple[Any, ...]], None]) -> None:
        self._conn, self._on_push = conn, on_push
        self.send, self.close = conn.send, conn.close

    def recv(self) -> Any:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                self._on_push(("gone",))
                raise
            if message[0] != 0:
                return message
            try:
                self._on_push(tuple(message[1:]))
            except Exception:
                log.exception("worker: could not apply %s from the supervisor", message[1])


class HubStore(_ProcessStore):
    """The supervisor's ledger, reached over a Unix socket: `_ProcessStore`'s calls (rows,
    queries, statements, runs) and replies, plus rows one at a time and the gate's calls."""

    def __init__(self, address: str, authkey: bytes,
                 on_push: Callable[[tuple[Any, ...]], None]) -> None:
        try:
            conn = Client(address, family="AF_UNIX", authkey=authkey)
        except (OSError, EOFError) as exc:
            raise duckdb.IOException(f"the ledger's owner cannot be reached (lock): {exc}"
                                     ) from None
        self._conn = _Pushes(conn, on_push)  # type: ignore[assignment]
        self._send_lock = threading.Lock()
        self._pending: dict[int, Future[Any]] = {}
        self._ids = itertools.count(1)
        self.alive = True
        threading.Thread(target=self._receive, name="flowc-worker-link", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return None

    def call(self, op: str, *args: Any) -> Any:
        return self._call(op, *args)

    def post(self, *message: Any) -> None:
        """A message nobody answers (a row, a charge, an acknowledgement)."""
        self._send(message)

    def ingest(self, inbox: Path) -> None:
        """The owner takes its inbox in itself."""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.close()


class HubLedger(Ledger):
    """A worker's ledger: rows, queries and runs go to the supervisor; while it cannot be
    reached, rows are written as segments to the inbox (as any non-owner's are)."""

    def __init__(self, link: WorkerLink, path: Path, flush_interval: float) -> None:
        self._link = link
        super().__init__(path, flush_interval, in_process=False, take_over=True)

    def _open(self) -> bool:
        try:
            self._store = self._link.connect()  # type: ignore[assignment]
        except duckdb.IOException as exc:
            log.warning("ledger: %s; writing segments to %s", exc, self.inbox)
            self._next_try = time.monotonic() + _RETRY
            return False
        return True

    def _try_take_over(self) -> None:
        if time.monotonic() >= self._next_try:
            self._open()

    def record(self, call: CallRecord) -> None:
        store = self._store
        if store is not None:
            try:
                store.post("row", _fields_of(call))  # type: ignore[union-attr]
                return
            except LedgerUnavailable:
                self._lost(store)
        super().record(call)

    def flush(self) -> None:
        super().flush()  # rows that waited here while the supervisor could not be reached
        store = self._store
        if store is not None:
            with contextlib.suppress(LedgerUnavailable):
                store.call("flush")  # type: ignore[union-attr]


class HubAccessStore(LedgerAccessStore):
    """Keys in the ledger, and every change sent on to the other workers (answered once
    they all have it live)."""

    def __init__(self, ledger: HubLedger, link: WorkerLink) -> None:
        super().__init__(ledger)
        self._link = link

    def save_key(self, key: Key) -> None:
        super().save_key(key)
        self._link.call("key", key)


class RemoteReservation:
    """A call's hold on the supervisor's budget counters (`Reservation`'s interface)."""

    __slots__ = ("_link", "closed", "id")

    def __init__(self, link: WorkerLink, rid: int) -> None:
        self._link, self.id, self.closed = link, rid, False

    def charge(self, cost: Decimal | None) -> None:
        if cost:
            self._link.post("charge", self.id, str(cost))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._link.post("release", self.id)


class RemoteBudgets(Budgets):
    """Which scopes have a budget is known here (the plans need it); what they spent and
    hold is the supervisor's, so reservations and status ask it."""

    def __init__(self, link: WorkerLink, thresholds: Any) -> None:
        super().__init__(lambda _scope, _since: Decimal(0), thresholds, None)
        self._link = link

    def reserve_on(self, counters: list[Counter], amount: Decimal, now: float
                   ) -> RemoteReservation:  # type: ignore[override]
        got = self._link.admit([(c.scope.kind, c.scope.name) for c in counters], str(amount))
        if isinstance(got, int):
            return RemoteReservation(self._link, got)
        kind, name, label, limit, period, spent, reserved = got
        counter = Counter(Scope(kind, name, label), Decimal(limit), period,
                          datetime.now(UTC), None, Decimal(spent), Decimal(reserved))
        raise BudgetExceeded(counter, amount)

    def status(self, scope: Scope) -> dict[str, str] | None:
        if scope not in self.counters:
            return None
        return self._link.call("status", scope.kind, scope.name)  # type: ignore[no-any-return]


class RemoteWindow(Window):
    """A scope's rate limits, counted on the supervisor's window. `Gate.admit` checks every
    window, reserves, then takes every window, with no await between: here a check only
    joins the call's admission, which the reservation (or, with no budget, the first
    take) sends in one round trip that checks, reserves and takes together. The headers
    are those of this worker's last admission."""

    def __init__(self, link: WorkerLink, scope: Scope, rpm: int | None, tpm: int | None
                 ) -> None:
        super().__init__(str(scope), rpm, tpm)
        self._link, self.scope = link, scope
        self.shown: list[tuple[bytes, bytes]] = []

    def check(self, now: float) -> None:
        self._link.windows.append(self)

    def take(self, now: float) -> None:
        if self._link.windows:  # no budget: the windows go on their own
            self._link.admit([], None)

    def add_tokens(self, now: float, n: int) -> None:
        if self.tpm is not None and n > 0:
            self._link.post("tokens", self.scope.kind, self.scope.name, n)

    def headers(self, now: float) -> list[tuple[bytes, bytes]]:
        return self.shown


class WorkerGate(Gate):
    """The gate with the supervisor's budget counters and rate-limit windows."""

    def __init__(self, link: WorkerLink, config: ProjectConfig, store: HubAccessStore,
                 admin_key: str | None, alert: Callable[[Alert], None] | None) -> None:
        super().__init__(config, store, admin_key, alert)
        self.budgets = RemoteBudgets(link, config.alerts.thresholds)
        self._link = link

    def admit(self, *args: Any, **kwargs: Any) -> Any:
        self._link.windows.clear()
        try:
            return super().admit(*args, **kwargs)
        finally:  # a call refused before its admission was sent (an unpriced model)
            self._link.windows.clear()

    def _configure(self, scope: Scope, usd: Decimal | None, period: Any, rpm: int | None,
                   tpm: int | None) -> None:
        super()._configure(scope, usd, period, rpm, tpm)
        w = self._windows.get(scope)
        if w is not None and not isinstance(w, RemoteWindow):
            w = self._windows[scope] = RemoteWindow(self._link, scope, rpm, tpm)
            if scope.kind == "key":
                self._key_windows[scope.name] = w


class WorkerLink:
    """What a worker process shares with the supervisor: built before its server starts,
    wired into its Runtime by `Runtime.start`."""

    def __init__(self, address: str, authkey: bytes) -> None:
        self.address, self.authkey = address, authkey
        self.store: HubStore | None = None
        self.gate: WorkerGate | None = None
        self.alert: Callable[[Alert], None] | None = None
        # The windows `Gate.admit` has checked for the call it is admitting (on the event
        # loop, no await in between; see RemoteWindow).
        self.windows: list[RemoteWindow] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._parent = os.getppid()  # the supervisor
        self.hub_ledger: HubLedger | None = None
        self.registry: Registry | None = None  # set by Runtime.start

    def connect(self) -> HubStore:
        self.store = HubStore(self.address, self.authkey, self._pushed)
        return self.store

    def _live(self) -> HubStore:
        store = self.store
        if store is None or not store.alive:
            raise LedgerUnavailable("the supervisor that owns the ledger cannot be reached")
        return store

    def call(self, op: str, *args: Any) -> Any:
        return self._live().call(op, *args)

    def post(self, *message: Any) -> None:
        with contextlib.suppress(LedgerUnavailable):
            self._live().post(*message)

    def admit(self, scopes: list[tuple[str, str]], amount: str | None) -> Any:
        """One call's admission on the supervisor: the windows checked so far, then the
        budgets' reservation of ``amount`` (None: none), then the windows taken; raises
        RateLimited, or returns the reservation's id or the budget that refused it."""
        windows, self.windows = self.windows, []
        got = self.call("admit", [(w.scope.kind, w.scope.name) for w in windows], scopes,
                        amount)
        if got[0] == "limited":
            raise RateLimited(got[1], got[2])
        for w, shown in zip(windows, got[1], strict=True):
            w.shown = shown
        return got[2]

    # -- the parts of a worker's Runtime ----------------------------------------------------
    def ledger(self, path: Path, flush_interval: float) -> HubLedger:
        self.hub_ledger = HubLedger(self, path, flush_interval)
        return self.hub_ledger

    def access_store(self, ledger: Ledger) -> HubAccessStore:
        assert isinstance(ledger, HubLedger)
        return HubAccessStore(ledger, self)

    def make_gate(self, config: ProjectConfig, store: HubAccessStore, admin_key: str | None,
                  alert: Callable[[Alert], None]) -> WorkerGate:
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()
        self.gate = WorkerGate(self, config, store, admin_key, alert)
        self.alert = alert
        return self.gate

    # -- what the supervisor sends ----------------------------------------------------------
    def _pushed(self, message: tuple[Any, ...]) -> None:
        """On the link's reader thread: anything touching the gate runs on the event loop,
        where requests read it."""
        what = message[0]
        if what == "gone":
            # Adopted: the supervisor is gone (its socket closes just before the adoption).
            for _ in range(50):
                if os.getppid() != self._parent:
                    log.warning("worker: the supervisor is gone; shutting down")
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
                time.sleep(0.1)
            return
        if what == "key":
            _, ack, key = message
            self._on_loop(lambda: self._put(key), lambda: self.post("ack", ack))
        elif what == "workflows":  # reads the ledger: not on this thread, which answers
            threading.Thread(target=self._refresh, args=(message[1],), daemon=True).start()
        elif what == "alert" and self.alert is not None:
            self._on_loop(lambda: self.alert(message[1]), None)  # type: ignore[misc]

    def _refresh(self, ack: int) -> None:
        try:
            if self.registry is not None and self.hub_ledger is not None:
                self.registry.refresh(self.hub_ledger)
        except Exception:
            log.exception("worker: could not load the pipelines registered on another")
        finally:
            self.post("ack", ack)

    def _put(self, key: Key) -> None:
        if self.gate is not None:
            self.gate.put(key)

    def _on_loop(self, fn: Callable[[], None], then: Callable[[], None] | None) -> None:
        def run() -> None:
            try:
                fn()
            finally:
                if then is not None:
                    then()

        loop = self._loop
        if loop is None or loop.is_closed():
            run()
        else:
            loop.call_soon_threadsafe(run)

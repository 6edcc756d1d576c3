"""A worker's side of `flowc serve --workers N`: its ledger, keys, budgets and rate limits
all go through one connection to the supervisor, which owns the ledger (hub.py).

- Rows: each row is sent as it is recorded (a pickled tuple, one write on a Unix socket)
  instead of waiting in this process for a frame: what a worker has answered is in the
  socket's buffer or beyond it, so a worker killed with -9 loses no answered row.
- Budgets: leased from the supervisor in slices, as instances lease from Postgres
  (runtime/pg/access.py's `SharedBudgets`, the same counters and rule): calls reserve
  and charge against this worker's lease in memory, and every `TICK` the worker settles
  what it charged and hands back what it does not need, in one message. A call waits
  for the supervisor (without holding up the others) only when the lease has run out;
  the slices never add up past the budget, so the workers together never pass it.
- Rate limits: request slots leased from the supervisor's windows a few at a time, so
  most calls are admitted without a round trip, and never more than the limit across
  workers (see `RemoteWindow`); unused slots go back within a second or two.
- Responses API conversations (`previous_response_id`): kept in the supervisor's one
  bounded store (`SupervisedResponses`), so a follow-up finds them on any worker.
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
from decimal import Decimal
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

import duckdb
import orjson

from flowc.config import ProjectConfig
from runtime.access.budgets import ZERO, Alert, Scope
from runtime.access.gate import Denied, Gate, Grant, Principal
from runtime.access.keys import Key, KeyChanged
from runtime.access.limits import RateLimited, Window
from runtime.access.store import LedgerAccessStore
from runtime.gateway.responses_store import Items, ResponsesUnavailable, encode
from runtime.ledger.store import (
    CallRecord,
    Ledger,
    LedgerUnavailable,
    _fields_of,
    _ProcessStore,
)
from runtime.pg.access import (
    TICK,
    Settlement,
    SharedBudgets,
    SharedCounter,
    Ticking,
    lease_size,
)
from runtime.workflows import Registry

log = logging.getLogger("flowc.workers")
_RETRY = 1.0  # seconds between attempts to reach the supervisor again


class _Pushes:
    """The connection as `_ProcessStore` reads it: what the supervisor pushes (id 0) is
    handed to ``on_push`` on the way, replies pass through."""

    def __init__(self, conn: Connection, on_push: Callable[[tuple[Any, ...]], None]) -> None:
        self._conn, self._on_push = conn, on_push
        self.send, self.close, self.fileno = conn.send, conn.close, conn.fileno

    def recv(self) -> Any:
        while True:
            message = self._conn.recv()
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
        self._on_push = on_push
        self._send_lock = threading.Lock()
        self._pending: dict[int, Future[Any]] = {}
        self._ids = itertools.count(1)
        self.alive = True
        threading.Thread(target=self._receive, name="flowc-worker-link", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return None

    def _receive(self) -> None:
        try:
            super()._receive()  # until the connection is gone, then fails what waits
        finally:
            self._on_push(("gone",))

    def call(self, op: str, *args: Any) -> Any:
        return self._call(op, *args)

    async def call_async(self, op: str, *args: Any) -> Any:
        """A call whose answer is awaited: the event loop goes on meanwhile."""
        return await asyncio.wrap_future(self._request(op, *args))

    def post(self, *message: Any) -> None:
        """A message nobody answers (a row, a charge, an acknowledgement)."""
        self._send(message)

    def ingest(self, inbox: Path) -> None:
        """The owner takes its inbox in itself."""

    def close(self) -> None:
        """After the ledger's writer has sent its last rows: one round trip, answered once
        the supervisor has written every row this worker sent, then let go."""
        with contextlib.suppress(LedgerUnavailable):
            self.call("flush")
        self._hang_up()


class HubLedger(Ledger):
    """A worker's ledger: rows, queries and runs go to the supervisor; while it cannot be
    reached, rows are written as segments to the inbox (as any non-owner's are)."""

    def __init__(self, link: WorkerLink, path: Path, flush_interval: float) -> None:
        self._link = link
        # Rows recorded on the event loop in one iteration of it, sent together at its end.
        self._batch: list[tuple[Any, ...]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
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
        """On the event loop, the rows of one loop iteration go to the supervisor as one
        message when it ends: one send and one wake-up of the supervisor for all the calls
        that ended together, instead of one each. A response is written at the end of the
        iteration too (runtime/http_server.py), after the rows recorded before it, so a
        worker killed with -9 has still sent every row it answered. Elsewhere (a thread),
        a row is sent at once."""
        row = _fields_of(call)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._send([row])
            return
        if not self._batch:
            self._loop = loop
            loop.call_soon(self._send_batch)
        self._batch.append(row)

    def _send_batch(self) -> None:
        rows, self._batch = self._batch, []
        self._send(rows)

    def close(self) -> None:
        self._send_batch()  # rows of the loop's last iteration, if it stopped before sending
        super().close()

    def _send(self, rows: list[tuple[Any, ...]]) -> None:
        store = self._store
        if store is not None and rows:
            try:
                if len(rows) == 1:
                    store.post("row", rows[0])  # type: ignore[union-attr]
                else:
                    store.post("batch", rows)  # type: ignore[union-attr]
                return
            except LedgerUnavailable:
                self._lost(store)
        for row in rows:
            self.add_row(row)

    def flush(self) -> None:
        if self._batch and self._loop is not None:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is self._loop:  # on the loop: nothing else touches the batch now
                self._send_batch()
        super().flush()  # rows that waited here while the supervisor could not be reached
        store = self._store
        if store is not None:
            with contextlib.suppress(LedgerUnavailable):
                store.call("flush")  # type: ignore[union-attr]


class HubAccessStore(LedgerAccessStore):
    """Keys in the ledger, saved by the supervisor (which refuses a change another worker
    beat to the key, see `Hub._key`) and sent on to the other workers (answered once they
    all have it live)."""

    def __init__(self, ledger: HubLedger, link: WorkerLink) -> None:
        super().__init__(ledger)
        self._link = link

    def save_key(self, key: Key, base: Key | None = None) -> None:
        if not self._link.call("key", key, base):
            raise KeyChanged(f"key {key.id} was changed through another worker")

    async def aclose(self) -> None:
        """At shutdown: settle with the supervisor, hand back every lease."""
        if self._link.gate is not None:
            await self._link.gate.leases.aclose()


class HubLeases(Ticking):
    """What `SharedBudgets` leases from: the supervisor's counters (hub.py), as
    runtime/pg/access.py's `PgAccessStore` is for instances on Postgres. Each `TICK` one
    message settles what this worker charged, hands back what it does not need, leases
    ahead, and reads every budget's totals (what other workers spent)."""

    on_outage = "closed"  # a worker without its supervisor is shutting down

    def __init__(self, link: WorkerLink, thresholds: Any) -> None:
        self._link = link
        self.online = True
        # Alerts fire on the supervisor's counters (one per threshold for all workers).
        self.budgets = SharedBudgets(self, thresholds, None)  # type: ignore[arg-type]

    def outage(self, c: Any) -> Denied:
        return Denied(503, "budget_store_unavailable", (
            f"The server is temporarily unable to check the budget of {c.scope}: this "
            "worker has lost its supervisor. Please retry your request after a brief "
            "wait."))

    async def grant(self, c: SharedCounter, need: Decimal, amount: Decimal) -> bool:
        """Lease at least ``need`` more of ``c``'s budget (one round trip, awaited);
        False when the budget has not that much left."""
        need, want = lease_size(c, need, amount)
        if need + c.settled > c.limit:
            return False  # known already: no round trip
        try:
            got = await self._link.call_async("lease", c.scope.kind, c.scope.name,
                                              c.start.timestamp(), need, want)
        except LedgerUnavailable:
            self.online = False
            raise self.outage(c) from None
        if got is None:  # the supervisor has no such budget (changed meanwhile)
            return False
        granted, c.settled, c.leased_all = got
        if granted is None:
            return False
        c.lease += granted
        return True

    async def tick(self, final: bool = False) -> None:
        """Settle, hand back, lease ahead, read the totals. ``final``: hand back all. Rate
        limits' slots held too long go back too."""
        gate = self._link.gate
        if gate is not None:
            self._link.hand_back(list(gate._windows.values()), final)
        b = self.budgets
        taken: list[Settlement] = b.settlements(final)
        watched = list(b.counters.values())
        if not taken and not watched:
            return
        items = [(c.scope.kind, c.scope.name, c.start.timestamp(), d, dl + back,
                  ZERO if final else more) for c, d, dl, back, more in taken]
        try:
            granted, totals = await self._link.call_async(
                "settle", items, [(c.scope.kind, c.scope.name) for c in watched])
        except LedgerUnavailable:
            b.restore(taken)
            self.online = False
            return
        self.online = True
        if final:
            return
        b.refresh({(c.scope.kind, c.scope.name, c.start): t
                   for c, t in zip(watched, totals, strict=True) if t is not None},
                  set(), {id(c): g for (c, *_), g in zip(taken, granted, strict=True) if g})

    async def aclose(self) -> None:
        """Settle and hand every lease back."""
        await self._stop_ticking()


class SupervisedResponses:
    """The Responses API's kept conversations (runtime/gateway/responses_store.py), in the
    supervisor's one bounded store: `remember` returns once the supervisor has it (one
    round trip, before the response is answered), `recall` asks it. Nothing is kept here
    as well: a copy per worker would multiply the memory bound by the workers, let the
    supervisor's LRU order drift from what is used, and save one local round trip beside
    a call to a model."""

    def __init__(self, link: WorkerLink) -> None:
        self._link = link

    async def remember(self, response_id: str, items: Items) -> None:
        try:
            await self._link.call_async("response_put", response_id, encode(items))
        except LedgerUnavailable as exc:  # answered all the same: the tokens are spent
            log.warning("worker: response %s not kept: %s", response_id, exc)

    async def recall(self, response_id: str) -> Items | None:
        try:
            found = await self._link.call_async("response_get", response_id)
        except LedgerUnavailable:
            raise ResponsesUnavailable(
                "The server is temporarily unable to read previous responses: this worker "
                "has lost its supervisor. Please retry your request after a brief wait."
            ) from None
        return None if found is None else orjson.loads(found)  # type: ignore[no-any-return]

    def close(self) -> None:
        pass


# A worker leases request slots for about this many seconds of its recent admissions,
# and hands back the slots it has not used after `SLOT_TTL` seconds.
LEASE_AHEAD = 0.05
SLOT_TTL = 1.0
_ATTEMPTS = 32  # leases a call waits for (others may use each first) before it is refused
_UNLIMITED = 1 << 40  # slots of a window the supervisor no longer has (limits dropped)


class RemoteWindow(Window):
    """A scope's rate limits as a worker counts them: request slots leased from the
    supervisor's window, which counts them as taken when it leases them (so the workers
    together never pass the limit), then admitted here without a round trip until they run
    out (`WorkerLink.admit_windows`). A lease is at most an eighth of what is left shared
    among the workers, so near the limit each call asks, and it is exact there. Tokens
    counted here go to the supervisor with each lease and each tick (`TICK`); a call is
    checked against its total as of the last lease plus this worker's own since (the
    tolerance: what other workers' calls used and have not sent yet). The headers are the
    supervisor's count at the last lease with this worker's own since."""

    def __init__(self, link: WorkerLink, scope: Scope, rpm: int | None, tpm: int | None
                 ) -> None:
        super().__init__(str(scope), rpm, tpm)
        self._link, self.scope = link, scope
        self.slots = 0  # leased, not used yet
        self.leased_at = 0.0  # when (the machine's monotonic clock, the supervisor's too)
        # The supervisor's window at the last lease: requests left, oldest request, tokens
        # counted, oldest tokens; and this worker's tokens since.
        self.seen: tuple[int | None, float | None, int, float | None] = (None, None, 0, None)
        self.tokens_here = 0
        self.unsent = 0  # tokens counted here and not sent yet
        self._second, self._count, self._rate = 0, 0, 0  # admissions in the last second

    def check(self, now: float) -> None:
        pass

    def take(self, now: float) -> None:
        pass

    def ready(self, now: float) -> bool:
        """A slot is held here for the next call, and the tokens counted leave room (as
        of a lease no older than a tick, which is as often as other workers send theirs)."""
        if self.slots <= 0:
            return False
        if self.tpm is None:
            return now - self.leased_at < SLOT_TTL
        return now - self.leased_at < TICK and self.seen[2] + self.tokens_here < self.tpm

    def want(self) -> int:
        return max(1, int(self._rate * LEASE_AHEAD))

    def granted(self, slots: int, at: float, *seen: Any) -> None:
        # What calls counted after this lease's tokens were sent is not in ``seen``.
        self.slots, self.leased_at, self.tokens_here = slots, at, self.unsent
        self.seen = seen  # type: ignore[assignment]

    def use(self, now: float) -> None:
        self.slots -= 1
        second = int(now)
        if second != self._second:
            self._rate = self._count if second == self._second + 1 else 0
            self._second, self._count = second, 0
        self._count += 1

    def add_tokens(self, now: float, n: int) -> None:
        if self.tpm is not None and n > 0:
            self.tokens_here += n
            self.unsent += n

    def send_tokens(self) -> None:
        """The tokens counted here since the last send, to the supervisor's window: with
        each lease and each tick, rather than a message a call."""
        if self.unsent:
            self._link.post("tokens", self.scope.kind, self.scope.name, self.unsent)
            self.unsent = 0

    def head_lines(self, now: float) -> bytes:
        left, oldest, tokens, oldest_tokens = self.seen
        if left is None and self.slots >= _UNLIMITED // 2:
            return b""
        return self.shown_lines(now, (left or 0) + self.slots, oldest,
                                (self.tpm or 0) - tokens - self.tokens_here, oldest_tokens)


class WorkerGate(Gate):
    """The gate with budgets leased from the supervisor and its rate-limit windows."""

    def __init__(self, link: WorkerLink, config: ProjectConfig, store: HubAccessStore,
                 admin_key: str | None, alert: Callable[[Alert], None] | None) -> None:
        super().__init__(config, store, admin_key, alert)
        self._link = link
        self.leases = HubLeases(link, config.alerts.thresholds)
        self.budgets = self.leases.budgets
        self.leases._start_ticking()

    async def admit_wait(self, who: Principal, requested: str, targets: Any,
                         req: dict[str, Any], prompt_bound: int | None, tags: str | None,
                         pipeline: str | None) -> Grant | None:
        grant = await super().admit_wait(who, requested, targets, req, prompt_bound, tags,
                                         pipeline)
        if grant is not None and grant.windows:
            try:
                await self._link.admit_windows(grant.windows)  # type: ignore[arg-type]
            except BaseException:
                grant.close()
                raise
        return grant

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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._parent = os.getppid()  # the supervisor
        self.hub_ledger: HubLedger | None = None
        self.registry: Registry | None = None  # set by Runtime.start
        self._refreshing = threading.Condition()  # pushed pipeline changes to read
        self._to_refresh: list[int] = []  # their acknowledgements
        self._refresher: threading.Thread | None = None
        self._leasing = asyncio.Lock()  # one lease of rate-limit slots in flight
        self._waiting = 0  # calls waiting for rate-limit slots

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

    async def call_async(self, op: str, *args: Any) -> Any:
        return await self._live().call_async(op, *args)

    def post(self, *message: Any) -> None:
        with contextlib.suppress(LedgerUnavailable):
            self._live().post(*message)

    async def admit_windows(self, windows: list[RemoteWindow]) -> None:
        """One call's rate limits: a slot of each window, from what this worker holds, or
        leased from the supervisor for the windows that hold none: one lease in flight
        at a time, for as many slots as calls are waiting (or the recent rate asks).
        Raises RateLimited, or Denied (503) while the supervisor cannot be reached (the
        limits hold across workers: none is admitted on this worker's say alone)."""
        self._waiting += 1
        try:
            for _ in range(_ATTEMPTS):
                now = time.monotonic()
                if all(w.ready(now) for w in windows):
                    for w in windows:
                        w.use(now)
                    return
                async with self._leasing:
                    await self._lease_slots(windows)
                # Other calls may have used what was leased meanwhile: look again.
        finally:
            self._waiting -= 1
        w = windows[0]
        raise RateLimited(f"rate limit reached for {w.label}: too many calls at once; try "
                          "again in 1s", 1.0)

    async def _lease_slots(self, windows: list[RemoteWindow]) -> None:
        now = time.monotonic()
        short = [w for w in windows if not w.ready(now)]
        if not short:
            return  # the lease before this one brought enough
        items = []
        for w in short:  # what it holds and may not use goes back with the lease
            w.send_tokens()  # first (one connection: in order), so the lease counts them
            items.append((w.scope.kind, w.scope.name, max(w.want(), self._waiting),
                          w.slots, w.leased_at))
            w.slots = 0
        try:
            got = await self.call_async("slots", items)
        except LedgerUnavailable:
            raise Denied(503, "rate_limit_store_unavailable", (
                "The server is temporarily unable to check the rate limits of "
                f"{', '.join(str(w.scope) for w in windows)}: this worker has lost its "
                "supervisor. Please retry your request after a brief wait.")) from None
        if got[0] == "limited":
            for w, seen in zip(short, got[3], strict=True):
                if seen is not None:  # what the refusal's headers show
                    w.granted(0, now, *seen)
            raise RateLimited(got[1], got[2])
        for w, lease in zip(short, got[1], strict=True):
            if lease is None:  # the supervisor has no such limit now
                w.granted(_UNLIMITED, now, None, None, 0, None)
            else:
                w.granted(*lease)

    def hand_back(self, windows: Any, final: bool = False) -> None:
        """At each tick: tokens counted go to the supervisor, and slots held past
        `SLOT_TTL` (``final``: all of them) stop counting on its windows."""
        now = time.monotonic()
        for w in windows:
            if not isinstance(w, RemoteWindow):
                continue
            w.send_tokens()
            if 0 < w.slots < _UNLIMITED // 2 and (final or now - w.leased_at >= SLOT_TTL):
                self.post("unslot", w.scope.kind, w.scope.name, w.leased_at, w.slots)
                w.slots = 0

    # -- the parts of a worker's Runtime ----------------------------------------------------
    def ledger(self, path: Path, flush_interval: float) -> HubLedger:
        self.hub_ledger = HubLedger(self, path, flush_interval)
        return self.hub_ledger

    def conversations(self) -> SupervisedResponses:
        return SupervisedResponses(self)

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
        if what == "gone":  # the calls waiting have failed: whether to stop, elsewhere
            threading.Thread(target=self._orphaned, name="flowc-worker-orphaned",
                             daemon=True).start()
            return
        if what == "key":
            _, ack, key = message
            self._on_loop(lambda: self._put(key), lambda: self.post("ack", ack))
        elif what == "workflows":  # reads the ledger: not on this thread, which answers
            self._refresh_later(message[1])
        elif what == "alert" and self.alert is not None:
            self._on_loop(lambda: self.alert(message[1]), None)  # type: ignore[misc]

    def _orphaned(self) -> None:
        """Adopted: the supervisor is gone (its socket closes just before the adoption);
        shut down. Otherwise only the connection was lost: the ledger connects again
        once a row finds it gone."""
        for _ in range(50):
            if os.getppid() != self._parent:
                log.warning("worker: the supervisor is gone; shutting down")
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.1)

    def _refresh_later(self, ack: int) -> None:
        """One refresh at a time, on a thread of its own: two at once could end in the
        wrong order and leave an older version served. A refresh reads what is registered
        when it starts, so it answers every push that came before (they are coalesced)."""
        with self._refreshing:
            self._to_refresh.append(ack)
            self._refreshing.notify()
            if self._refresher is None:
                self._refresher = threading.Thread(target=self._refresh, daemon=True,
                                                   name="flowc-worker-refresh")
                self._refresher.start()

    def _refresh(self) -> None:
        while True:
            with self._refreshing:
                self._refreshing.wait_for(lambda: bool(self._to_refresh))
                acks, self._to_refresh = self._to_refresh, []
            try:
                if self.registry is not None and self.hub_ledger is not None:
                    self.registry.refresh(self.hub_ledger)
            except Exception:
                log.exception("worker: could not load the pipelines registered on another")
            finally:
                for ack in acks:
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

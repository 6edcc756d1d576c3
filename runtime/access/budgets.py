"""Budgets that hold under concurrency: reserve a call's largest possible cost before it
is made, charge what each attempt really cost as its ledger row is written, release the
rest when the call ends.

Every check-and-reserve runs on the event loop without an await between the check and
the update, so two requests can never both take the last dollar. Counters are a cache of
the ledger: at start each budget's spend in its current period is summed from the rows
(see `AccessStore.spend`), and a new period starts from zero.
"""

from __future__ import annotations

import calendar
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from flowc.cost import amount, usd
from runtime.access.keys import Period

log = logging.getLogger("flowc.budgets")
ZERO = Decimal(0)
INFINITY = Decimal("Infinity")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def period_start(period: Period, now: datetime) -> datetime:
    """Where the calendar period (UTC) holding ``now`` began; weeks start on Monday."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    return EPOCH


def period_end(period: Period, start: datetime) -> datetime | None:
    if period == "day":
        return start + timedelta(days=1)
    if period == "week":
        return start + timedelta(days=7)
    if period == "month":
        days = calendar.monthrange(start.year, start.month)[1]
        return start + timedelta(days=days)
    return None


@dataclass(frozen=True, slots=True)
class Scope:
    """What a budget is on: ``kind`` key | team | tag | pipeline, and which one."""

    kind: str
    name: str
    label: str | None = field(default=None, compare=False)  # what messages call it

    def __str__(self) -> str:
        return f"{self.kind} '{self.label or self.name}'"


@dataclass(slots=True)
class Counter:
    scope: Scope
    limit: Decimal
    period: Period
    start: datetime
    end: float | None  # POSIX seconds; None for `total`
    spent: Decimal = ZERO
    reserved: Decimal = ZERO
    alerted: set[int] = field(default_factory=set)  # thresholds fired this period
    # The spend at which the next alert is due (see `Budgets.charge`): zero makes the next
    # charge look, after the limit or the thresholds fired have changed.
    alert_at: Decimal = ZERO

    def left(self) -> Decimal:
        return self.limit - self.spent - self.reserved


class BudgetExceeded(Exception):
    """A call that would take a budget past its limit. The message names the budget, its
    limit and what is left."""

    def __init__(self, counter: Counter, needed: Decimal) -> None:
        left = max(counter.left(), ZERO)
        per = "in total" if counter.period == "total" else f"per {counter.period}"
        super().__init__(
            f"budget exceeded for {counter.scope}: limit {usd(counter.limit)} {per}, "
            f"{usd(left)} left, and this request may cost up to {usd(needed)}")
        self.counter, self.needed = counter, needed


class LeaseNeeded(Exception):
    """A budget shared with other processes has too little headroom held here for the
    call: ``wait`` is the lease asked for, true once granted, false when the budget has
    not that much left (`Gate.admit_wait` awaits it and admits again). ``own``: asked
    for this call's need; else another call's lease, asked for before, is awaited."""

    def __init__(self, counter: Counter, amount: Decimal, wait: Awaitable[bool],
                 own: bool) -> None:
        super().__init__(f"leasing more of {counter.scope}'s budget")
        self.counter, self.amount, self.wait, self.own = counter, amount, wait, own


@dataclass(frozen=True, slots=True)
class Alert:
    scope: Scope
    threshold: int  # percent
    limit: Decimal
    spent: Decimal
    period: Period
    period_start: datetime


class Reservation:
    """One call's hold on its budgets: ``held`` on each of ``counters`` (made by
    `Budgets.reserve_on`). ``spend`` each attempt's cost, ``close`` at the end."""

    __slots__ = ("budgets", "counters", "held")

    def __init__(self, budgets: Budgets, counters: list[Counter], held: Decimal) -> None:
        self.budgets, self.counters, self.held = budgets, counters, held

    def spend(self, cost: Decimal | None) -> None:
        """An attempt's cost becomes spend; as much of it as is held stops being held."""
        if cost:
            held = self.held
            take = cost if cost < held else held
            self.held = held - take
            self.budgets.charge(self.counters, cost, take)

    def close(self) -> None:
        """What is still held goes back (once: a second close releases nothing)."""
        held = self.held
        if held:
            self.held = ZERO
            for c in self.counters:
                c.reserved -= held


class Budgets:
    """The live counters. ``spend(scope, since)`` sums the ledger (at start, and when a
    budget is added while running); ``alert`` is told each soft threshold crossed."""

    def __init__(self, spend: Callable[[Scope, datetime], Decimal],
                 thresholds: Iterable[int] = (50, 80, 100),
                 alert: Callable[[Alert], None] | None = None) -> None:
        self._spend = spend
        self.thresholds = sorted(thresholds)
        self._alert = alert
        self.counters: dict[Scope, Counter] = {}
        # Spend read beforehand, by (scope, period start), for budgets about to be `set`:
        # the read is a ledger query, made off the event loop (or outside a lock), and
        # the change then goes live without waiting on the ledger (see `reads`).
        self.known: dict[tuple[Scope, datetime], Decimal] = {}

    def set(self, scope: Scope, limit: Decimal | None, period: Period,
            now: datetime | None = None) -> None:
        """Add, change or (``limit`` None) drop the budget on ``scope``."""
        if limit is None:
            self.counters.pop(scope, None)
            return
        old = self.counters.get(scope)
        now = now or datetime.now(UTC)
        if old is not None and old.period == period:
            old.limit, old.alert_at = limit, ZERO
            return
        start = period_start(period, now)
        end = period_end(period, start)
        spent = self.known.get((scope, start))
        counter = Counter(scope, limit, period, start,
                          end.timestamp() if end is not None else None,
                          spent=spent if spent is not None else self._spend(scope, start))
        if old is not None:
            counter.reserved = old.reserved
        self._mark_crossed(counter)
        self.counters[scope] = counter

    def reads(self, scope: Scope, limit: Decimal | None, period: Period,
              now: datetime | None = None) -> dict[tuple[Scope, datetime], Decimal]:
        """The spend `set(scope, limit, period)` would read from the ledger, read now: call
        this where waiting is harmless, then `set` with the result in `known`."""
        old = self.counters.get(scope)
        if limit is None or (old is not None and old.period == period):
            return {}
        start = period_start(period, now or datetime.now(UTC))
        return {(scope, start): self._spend(scope, start)}

    def _mark_crossed(self, c: Counter) -> None:
        """Thresholds already passed when a period's spend is loaded fire no new alert."""
        if c.limit:
            pct = c.spent * 100 / c.limit
            c.alerted.update(t for t in self.thresholds if pct >= t)

    def _roll(self, c: Counter, now: float) -> None:
        if c.end is not None and now >= c.end:
            start = period_start(c.period, datetime.fromtimestamp(now, UTC))
            end = period_end(c.period, start)
            c.start, c.end = start, end.timestamp() if end is not None else None
            c.spent, c.alerted, c.alert_at = ZERO, set(), ZERO  # reservations stay held

    def reserve(self, scopes: Iterable[Scope], amount: Decimal, now: float) -> Reservation:
        """Hold ``amount`` on every budget among ``scopes``, or raise BudgetExceeded for
        the first that cannot take it (holding nothing)."""
        counters = [c for s in scopes if (c := self.counters.get(s)) is not None]
        self.reserve_on(counters, amount, now)
        return Reservation(self, counters, amount)

    def reserve_on(self, counters: list[Counter], amount: Decimal, now: float) -> None:
        """``reserve`` on counters already looked up (the gate keeps them per caller, and
        makes the `Reservation` part of its grant)."""
        for c in counters:
            if c.end is not None and now >= c.end:
                self._roll(c, now)
            if c.spent + c.reserved + amount > c.limit:
                raise BudgetExceeded(c, amount)
        for c in counters:
            c.reserved += amount

    def charge(self, counters: list[Counter], cost: Decimal, held: Decimal = ZERO) -> None:
        """``cost`` becomes spend on each counter; ``held`` of it was reserved there and
        stops being (one pass over the counters for both)."""
        for c in counters:
            c.reserved -= held
            c.spent += cost
            if c.spent >= c.alert_at:
                self._crossed(c)

    def _crossed(self, c: Counter) -> None:
        """An alert for each threshold ``c``'s spend has newly crossed; then the spend at
        which the next is due, so a charge below it costs one comparison."""
        if not c.limit or self._alert is None:
            c.alert_at = INFINITY
            return
        pct = c.spent * 100 / c.limit
        for t in self.thresholds:
            if pct >= t and t not in c.alerted:
                c.alerted.add(t)
                self._alert(Alert(c.scope, t, c.limit, c.spent, c.period, c.start))
        due = [t for t in self.thresholds if t not in c.alerted]
        c.alert_at = c.limit * due[0] / 100 if due else INFINITY

    def status(self, scope: Scope) -> dict[str, str] | None:
        c = self.counters.get(scope)
        if c is None:
            return None
        return {"limit_usd": amount(c.limit), "period": c.period,
                "period_start": c.start.isoformat(), "spent_usd": amount(c.spent),
                "reserved_usd": amount(c.reserved), "left_usd": amount(max(c.left(), ZERO))}

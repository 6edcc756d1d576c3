"""The counters behind keys' rate limits and budgets, against their plain definitions: they
run on every request of a limited or budgeted key, so they take shortcuts (header lines
made once, the next alert's spend precomputed) that must never change what they say."""

from __future__ import annotations

import re
import time
from array import array
from datetime import UTC, datetime
from decimal import Decimal

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowc.config import ProjectConfig
from runtime.access.budgets import Alert, BudgetExceeded, Budgets, Scope
from runtime.access.gate import Gate, Grant, Principal
from runtime.access.limits import WINDOW, RateLimited, Window, _past, _reset
from runtime.access.store import LedgerAccessStore
from runtime.ledger.store import CallRecord, Ledger
from runtime.providers import Target

RESET = re.compile(rb"(?:(\d+)m)?(\d+)(?:\.(\d{1,3}))?s|(\d+)ms")


def _ms(text: bytes) -> int:
    m = RESET.fullmatch(text)
    assert m is not None, text
    minutes, whole, frac, ms = m.groups()
    if ms is not None:
        assert int(ms) < 1000, text
        return int(ms)
    assert frac is None or not frac.endswith(b"0"), text  # 1.5s, never 1.500s
    return int(minutes or 0) * 60000 + int(whole) * 1000 + int((frac or b"").ljust(3, b"0"))


@given(st.floats(min_value=-5, max_value=400, allow_nan=False))
def test_a_reset_is_the_duration_to_the_millisecond_in_openais_format(seconds):
    want = max(int(seconds * 1000 + 0.5), 0) if seconds > 0 else 0
    assert _ms(_reset(seconds)) == want


@settings(max_examples=200)
@given(st.lists(st.tuples(st.floats(min_value=0, max_value=200), st.integers(0, 500)),
                max_size=60),
       st.integers(1, 30), st.integers(1, 4000))
def test_headers_count_what_the_last_minute_used(calls, rpm, tpm):
    """After any calls (time, tokens), the headers say what a plain count of the last 60
    seconds says: the limits, what is left, and when the oldest leaves the window."""
    w = Window("key 'k'", rpm, tpm)
    now = 0.0
    taken: list[tuple[float, int]] = []
    for gap, tokens in calls:
        now += gap
        w._trim(now)
        w.take(now)
        w.add_tokens(now, tokens)
        taken.append((now, tokens))
        inside = [(t, n) for t, n in taken if t > now - WINDOW]
        got = dict(w.headers(now))
        assert got[b"x-ratelimit-limit-requests"] == b"%d" % rpm
        assert got[b"x-ratelimit-limit-tokens"] == b"%d" % tpm
        assert int(got[b"x-ratelimit-remaining-requests"]) == max(rpm - len(inside), 0)
        used = sum(n for _, n in inside if n > 0)
        assert int(got[b"x-ratelimit-remaining-tokens"]) == max(tpm - used, 0)
        oldest = inside[0][0]
        assert _ms(got[b"x-ratelimit-reset-requests"]) == _reset_ms(oldest + WINDOW - now)
        spent = [t for t, n in inside if n > 0]
        want = _reset_ms(spent[0] + WINDOW - now) if spent else 0
        assert _ms(got[b"x-ratelimit-reset-tokens"]) == want


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from([0.0, 0.5, 1.0, 30.0, 59.5, 60.0, 61.0, 200.0]),
                          st.integers(0, 300)), max_size=80),
       st.integers(1, 12), st.integers(1, 1500))
def test_a_window_admits_exactly_what_the_last_minute_leaves_room_for(calls, rpm, tpm):
    """Calls admitted as the gate admits them (check, take, then their tokens), with no
    trim asked for: a call is refused exactly when a plain count of the last 60 seconds
    is at a limit, and says when the oldest leaves; the headers agree after every call.
    Gaps of exactly a minute put calls on the window's edge."""
    w = Window("key 'k'", rpm, tpm)
    now = 0.0
    taken: list[float] = []
    tokens: list[tuple[float, int]] = []
    for gap, n in calls:
        now += gap
        inside = [t for t in taken if t > now - WINDOW]
        spent = [(t, k) for t, k in tokens if t > now - WINDOW]
        over = len(inside) >= rpm or sum(k for _, k in spent) >= tpm
        try:
            w.check(now)
        except RateLimited as exc:
            assert over
            oldest = inside[0] if len(inside) >= rpm else spent[0][0]
            assert exc.retry_after == oldest + WINDOW - now
        else:
            assert not over
            w.take(now)
            taken.append(now)
            inside.append(now)
            w.add_tokens(now, n)
            if n > 0:
                tokens.append((now, n))
                spent.append((now, n))
        got = dict(w.headers(now))
        assert int(got[b"x-ratelimit-remaining-requests"]) == max(rpm - len(inside), 0)
        assert int(got[b"x-ratelimit-remaining-tokens"]) == max(
            tpm - sum(k for _, k in spent), 0)
        want = _reset_ms(inside[0] + WINDOW - now) if inside else 0
        assert _ms(got[b"x-ratelimit-reset-requests"]) == want


def _reset_ms(seconds: float) -> int:
    return int(seconds * 1000 + 0.5) if seconds > 0 else 0


# One step of a budget's life: a charge (cents), a new limit (dollars), or a new period.
STEPS = st.lists(st.one_of(st.tuples(st.just("charge"), st.integers(1, 4000)),
                           st.tuples(st.just("limit"), st.integers(1, 60)),
                           st.tuples(st.just("roll"), st.just(0))), max_size=40)


@settings(max_examples=300)
@given(STEPS, st.lists(st.integers(1, 150), min_size=1, max_size=4, unique=True))
def test_alerts_fire_once_per_threshold_when_spend_crosses_it(steps, thresholds):
    """Whatever the charges, limit changes and new periods, each threshold fires at the
    charge that takes the spend to it, once a period: the same alerts, at the same charges,
    as working out the percentage after every charge."""
    fired: list[tuple[int, int]] = []
    budgets = Budgets(lambda scope, since: Decimal(0), thresholds,
                      lambda a: fired.append((step, a.threshold)))
    scope = Scope("key", "k")
    budgets.set(scope, Decimal(10), "day", datetime(2026, 1, 1, tzinfo=UTC))
    c = budgets.counters[scope]
    limit, spent, alerted, want = Decimal(10), Decimal(0), set(), []
    for step, (kind, n) in enumerate(steps):
        if kind == "charge":
            cost = Decimal(n) / 100
            budgets.charge([c], cost)
            spent += cost
            pct = spent * 100 / limit
            for t in sorted(thresholds):
                if pct >= t and t not in alerted:
                    alerted.add(t)
                    want.append((step, t))
        elif kind == "limit":
            limit = Decimal(n)
            budgets.set(scope, limit, "day")
        else:
            assert c.end is not None
            budgets._roll(c, c.end)  # the next day
            spent, alerted = Decimal(0), set()
        assert c.spent == spent
    assert fired == want


def test_an_alert_names_the_budget_and_its_spend():
    seen: list[Alert] = []
    budgets = Budgets(lambda scope, since: Decimal(0), (50, 100), seen.append)
    scope = Scope("team", "finance")
    budgets.set(scope, Decimal(2), "month")
    counter = budgets.counters[scope]
    budgets.charge([counter], Decimal("0.99"))
    assert seen == []
    budgets.charge([counter], Decimal("0.01"))
    assert [(a.scope, a.threshold, a.spent, a.limit) for a in seen] == [
        (scope, 50, Decimal("1.00"), Decimal(2))]


def test_a_new_budget_goes_live_from_spend_read_beforehand(tmp_path):
    """A key given a budget starts from its spend so far in the period. The server reads
    that from the ledger off its event loop (`Gate.reads`, a query that may wait on the
    ledger's writer) and then puts the change live without touching the ledger: here it
    is closed by then, and the budget still starts from what the key had spent."""
    ledger = Ledger(tmp_path / "ledger.duckdb")
    gate = Gate(ProjectConfig(), LedgerAccessStore(ledger), None)
    gate.load()
    key, _ = gate.create({"name": "spender"})
    for cost in ("0.25", "0.5"):
        ledger.record(CallRecord(model="openai/gpt-4o-mini", provider="openai",
                                 served_model="gpt-4o-mini", success=True, status="ok",
                                 latency_ms=1.0, cost_usd=Decimal(cost), key_id=key.id,
                                 key_name=key.name))
    ledger.flush()
    budgeted = gate.updated(key.id, {"budget_usd": "5", "period": "month"})
    gate.store.save_key(budgeted)
    reads = gate.reads(budgeted)
    ledger.close()
    gate.put(budgeted, reads)
    status = gate.budget_status(budgeted)["key"]
    assert Decimal(status["spent_usd"]) == Decimal("0.75")
    assert Decimal(status["left_usd"]) == Decimal("4.25")
    # Without the spend read beforehand, putting it live needs the ledger.
    again = gate.updated(key.id, {"budget_usd": "7", "period": "week"})
    with pytest.raises(duckdb.ConnectionException):
        gate.put(again)


@settings(max_examples=200)
@given(st.lists(st.integers(0, 3000), max_size=6), st.integers(0, 4000),
       st.integers(1, 60), st.lists(st.integers(1, 150), min_size=1, max_size=3, unique=True))
def test_settling_a_call_is_charging_it_then_closing_it(attempts, worst, limit, thresholds):
    """A call's last row settles its grant in one pass (`Grant.settle`): the budget ends
    exactly as after charging that row and then closing the grant, alerts included,
    whatever earlier attempts charged (cents; the hold is the call's worst cost)."""
    ends = []
    for settle in (False, True):
        fired: list[int] = []
        budgets = Budgets(lambda scope, since: Decimal(0), thresholds,
                          lambda a, fired=fired: fired.append(a.threshold))
        scope = Scope("key", "k")
        budgets.set(scope, Decimal(limit), "day", datetime(2026, 1, 1, tzinfo=UTC))
        c = budgets.counters[scope]
        hold = Decimal(worst) / 100
        c.limit += hold  # room for the hold
        budgets.reserve_on([c], hold, 0.0)
        c.reserved += Decimal("1.5")  # other calls' holds stay held
        grant = Grant(budgets, [c], hold, [])
        *earlier, final = [Decimal(a) / 100 for a in attempts] or [None]
        for cost in earlier:
            grant.charge(cost, None)
        if settle:
            grant.settle(final, None)
        else:
            grant.charge(final, None)
        grant.close()
        ends.append((c.spent, c.reserved, fired))
    assert ends[0] == ends[1]
    assert ends[1][1] == Decimal("1.5")


@given(st.lists(st.integers(0, 40), max_size=30), st.integers(-1, 41), st.integers(0, 31))
def test_a_trim_finds_what_has_left_the_window_as_a_scan_does(times, edge, lo):
    """`_past` (bisection that looks at the next few entries first) against a scan: the
    first entry from ``lo`` after ``edge``, in a log in time order."""
    log = array("d", sorted(times))
    lo = min(lo, len(log))
    want = next((i for i in range(lo, len(log)) if log[i] > edge), len(log))
    assert _past(log, float(edge), lo) == want


def test_a_refused_call_leaves_no_request_counted(tmp_path):
    """A call refused by its budget, or by its team's rate limit, is counted by none of its
    windows: the key's headers still show every request left."""
    ledger = Ledger(tmp_path / "ledger.duckdb")
    config = ProjectConfig.model_validate({"budgets": {"teams": {"core": {"rpm": 1}}}})
    gate = Gate(config, LedgerAccessStore(ledger), None)
    gate.load()

    def caller(spec: dict) -> Principal:
        _, secret = gate.create({"team": "core", **spec})
        return gate.authenticate(b"Bearer " + secret.encode(), None)

    def admit(who: Principal) -> Grant | None:
        return gate.admit(who, "gpt-4o-mini", [Target("openai", "gpt-4o-mini")], req, None,
                          None, None)

    def left(who: Principal) -> bytes:
        return dict(who.window.headers(time.monotonic()))[b"x-ratelimit-remaining-requests"]

    req = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    poor = caller({"name": "poor", "rpm": 5, "budget_usd": "0.000001"})
    with pytest.raises(BudgetExceeded):
        admit(poor)
    assert left(poor) == b"5"
    other, late = caller({"name": "other"}), caller({"name": "late", "rpm": 5})
    admit(other)  # the team's one request this minute
    with pytest.raises(RateLimited, match="team 'core'"):
        admit(late)
    assert left(late) == b"5"
    ledger.close()

"""Keys, budgets and rate limits shared by several instances on one real Postgres
(tests/pgserver.py): gates in one process, each with its own connection to the store and
its own sync, as separate `flowc serve` instances have."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from flowc.config import ProjectConfig
from runtime.access.alerts import Alerter
from runtime.access.budgets import BudgetExceeded
from runtime.access.gate import Denied, Gate, Principal
from runtime.access.limits import RateLimited
from runtime.ledger.pricing import price
from runtime.pg.access import TICK, PgAccessStore
from runtime.providers import Target
from runtime.providers.base import Usage
from tests.fakes import FakeServer

MINI = Target("openai", "gpt-4o-mini")
REQ = {"model": "fast", "max_tokens": 400, "messages": [{"role": "user", "content": "hi"}]}
ACTUAL = Usage(prompt_tokens=300, completion_tokens=250)  # what each call really uses
COST = price("openai", "gpt-4o-mini", ACTUAL)[0]
assert COST is not None


def gate(url: str, config: ProjectConfig | None = None, **kw: Any) -> Gate:
    config = config or ProjectConfig()
    store = PgAccessStore(url, **kw)
    g = Gate(config, store, None, Alerter(config.alerts, store))
    g.load()
    return g


@asynccontextmanager
async def instances(url: str, n: int, config: ProjectConfig | None = None, **kw: Any
                    ) -> AsyncIterator[list[Gate]]:
    gates = [gate(url, config, **kw) for _ in range(n)]
    try:
        yield gates
    finally:
        for g in gates:
            await g.budgets._alert.drain()  # type: ignore[union-attr]
            await g.store.aclose()  # type: ignore[attr-defined]


def settled(url: str, kind: str, name: str) -> tuple[Decimal, Decimal]:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT sum(spent), sum(leased) FROM budget_spend WHERE kind = %s "
                           "AND name = %s", [kind, name]).fetchone()
    return row[0] or Decimal(0), row[1] or Decimal(0)


async def call(g: Gate, who: Principal) -> bool:
    """One model call through the gate: admitted (budget reserved), answered a moment
    later at its real cost, settled. False: refused for its budget."""
    try:
        grant = await g.admit_wait(who, "fast", [MINI], REQ, 200, None, None)
    except BudgetExceeded:
        return False
    await asyncio.sleep(random.uniform(0.001, 0.02))
    assert grant is not None
    grant.charge(COST, ACTUAL)
    grant.close()
    return True


async def until(check: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.02)


def test_three_instances_hammering_one_budget_never_pass_it(postgres) -> None:
    url = postgres.fresh_database()
    budget = COST * 50

    async def main() -> None:
        async with instances(url, 3) as gates:
            key, _ = gates[0].create({"name": "shared", "budget_usd": str(budget)})
            await until(lambda: all(key.id in g.keys for g in gates))
            who = [Principal("key", g.keys[key.id]) for g in gates]
            worst = gates[0].worst_cost([MINI], REQ, 200)
            served = 0
            for _ in range(8):  # waves of concurrent calls on all three at once
                done = await asyncio.gather(*(call(gates[i % 3], who[i % 3])
                                              for i in range(30)))
                served += sum(done)
            await asyncio.sleep(2 * TICK)
        spent, leased = settled(url, "key", key.id)
        assert leased == 0  # every lease handed back at shutdown
        assert spent == served * COST
        assert spent <= budget
        # Close to the budget: each instance may stop short by at most one call's
        # worst case (its last lease too small for another).
        assert spent >= budget - 3 * worst, (spent, budget, worst)

    asyncio.run(main())


def test_a_key_revoked_on_one_instance_is_refused_on_the_others(
        postgres) -> None:
    url = postgres.fresh_database()

    async def main() -> None:
        async with instances(url, 3) as gates:
            key, secret = gates[1].create({"name": "leaver"})
            bearer = f"Bearer {secret}".encode()
            await until(lambda: all(key.id in g.keys for g in gates))
            for g in gates:
                assert g.authenticate(bearer, None).key == key
            gates[0].revoke(key.id)

            def refused(g: Gate) -> bool:
                try:
                    g.authenticate(bearer, None)
                except Denied as exc:
                    assert exc.status == 401 and exc.code == "revoked_api_key"
                    return True
                return False

            await until(lambda: all(refused(g) for g in gates))

    asyncio.run(main())


def test_rate_limits_are_split_among_the_live_instances(postgres) -> None:
    url = postgres.fresh_database()

    async def main() -> None:
        async with instances(url, 3) as gates:
            key, _ = gates[0].create({"name": "limited", "rpm": 31})
            await until(lambda: all(key.id in g.keys and g.store.instances == 3  # type: ignore[attr-defined]
                                    for g in gates))
            served = 0
            for i in range(93):
                g = gates[i % 3]
                try:
                    g.admit(Principal("key", g.keys[key.id]), "fast", [MINI], REQ, 200, None,
                            None)
                    served += 1
                except RateLimited as exc:
                    assert "31 requests per minute" in str(exc)
            assert served == 31

    asyncio.run(main())


# restarted: the survivor is the killed instance started again under the same name (as
# `flowc serve --instance i0` after a kill -9), which must not take its leases for its own
@pytest.mark.parametrize("restarted", [False, True], ids=["other", "same-name"])
def test_a_killed_instances_lease_expires_and_its_rest_counts_as_spent(
        postgres, restarted: bool) -> None:
    url = postgres.fresh_database()
    budget = COST * 50
    names = {"instance": "host-a:8080"} if restarted else {}

    async def main() -> None:
        async with instances(url, 1, lease_ttl=1.0, **names) as (survivor,):
            key, _ = survivor.create({"name": "crashy", "budget_usd": str(budget)})
            doomed = gate(url, lease_ttl=1.0, **names)
            if restarted:  # one name, as on the ledger's rows; its own leases
                assert doomed.store.name == survivor.store.name == "host-a:8080"  # type: ignore[attr-defined]
                assert doomed.store.instance != survivor.store.instance  # type: ignore[attr-defined]
            await until(lambda: key.id in doomed.keys)
            who = Principal("key", doomed.keys[key.id])
            assert all(await asyncio.gather(*(call(doomed, who) for _ in range(5))))
            # Killed while busy, holding a lease: no settling, no hand-back, no renewal.
            store = doomed.store
            store._task.cancel()  # type: ignore[attr-defined]
            for conn in (store._bg, store._inline):  # type: ignore[attr-defined]
                if conn is not None:
                    conn.close()
            await asyncio.sleep(0.2)  # a sync it was making has ended (or rolled back)
            spent, leased = settled(url, "key", key.id)
            assert leased > 0 and spent + leased >= 5 * COST
            await until(lambda: settled(url, "key", key.id)[1] == 0, timeout=5)
            after, _ = settled(url, "key", key.id)
            # What it held may have been spent: counted so, the budget is never passed.
            assert after == spent + leased
            # The survivor goes on with what is left, and stops at the budget.
            mine = Principal("key", survivor.keys[key.id])
            served = 0
            while await call(survivor, mine):
                served += 1
            assert served > 0
            if restarted:
                with psycopg.connect(url) as conn:
                    held = conn.execute("SELECT DISTINCT instance FROM budget_leases"
                                        ).fetchall()
                assert held in ([], [(survivor.store.instance,)])  # type: ignore[attr-defined]
        total, leased = settled(url, "key", key.id)
        assert leased == 0 and total <= budget

    asyncio.run(main())


def test_store_down_budgeted_keys_fail_closed_others_keep_working_and_both_recover(
        postgres) -> None:
    url = postgres.fresh_database()

    async def main() -> None:
        async with instances(url, 2) as gates:
            g = gates[0]
            capped, capped_secret = g.create({"name": "capped", "budget_usd": "1"})
            free, free_secret = g.create({"name": "free"})
            await until(lambda: capped.id in gates[1].keys and free.id in gates[1].keys)
            postgres.stop()
            try:
                await until(lambda: not any(x.store.online for x in gates))  # type: ignore[attr-defined]
                for x in gates:
                    # Keys already loaded still authenticate.
                    who = x.authenticate(f"Bearer {capped_secret}".encode(), None)
                    with pytest.raises(Denied) as refused:
                        x.admit(who, "fast", [MINI], REQ, 200, None, None)
                    assert refused.value.status == 503
                    assert "shared store is unreachable" in refused.value.message
                    assert "key 'capped'" in refused.value.message
                    assert x.store.status()["reachable"] is False  # type: ignore[attr-defined]
                    assert x.admit(x.authenticate(None, f"{free_secret}".encode()), "fast",
                                   [MINI], REQ, 200, None, None) is None
            finally:
                postgres.start()
            await until(lambda: all(x.store.online for x in gates), timeout=10)  # type: ignore[attr-defined]
            for x in gates:
                assert await call(x, Principal("key", x.keys[capped.id]))
        spent, leased = settled(url, "key", capped.id)
        assert spent == 2 * COST and leased == 0

    asyncio.run(main())


def test_store_down_with_budgets_open_serves_and_settles_when_it_is_back(postgres) -> None:
    url = postgres.fresh_database()

    async def main() -> None:
        async with instances(url, 1, on_outage="open") as (g,):
            key, _ = g.create({"name": "lenient", "budget_usd": "1"})
            who = Principal("key", g.keys[key.id])
            postgres.stop()
            try:
                await until(lambda: not g.store.online)  # type: ignore[attr-defined]
                assert all(await asyncio.gather(*(call(g, who) for _ in range(4))))
            finally:
                postgres.start()
            await until(lambda: settled(url, "key", key.id)[0] == 4 * COST, timeout=10)

    asyncio.run(main())


def test_a_threshold_crossed_is_one_alert_row_and_one_webhook_across_instances(
        postgres) -> None:
    url = postgres.fresh_database()
    hook = FakeServer("openai").start()
    config = ProjectConfig.model_validate({"alerts": {"thresholds": [50, 80],
                                                      "webhook": hook.url + "/hook"}})

    async def main() -> None:
        async with instances(url, 3, config) as gates:
            key, _ = gates[0].create({"name": "watched", "budget_usd": str(COST * 20)})
            await until(lambda: all(key.id in g.keys for g in gates))
            who = [Principal("key", g.keys[key.id]) for g in gates]
            served = 0
            while served < 17:  # past 80%: calls three at a time, one on each instance
                served += sum(await asyncio.gather(*(
                    call(g, w) for g, w in zip(gates, who, strict=True))))
                await asyncio.sleep(TICK)
            await asyncio.sleep(4 * TICK)  # every instance sees the others' spend

    try:
        asyncio.run(main())
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT threshold, scope_name FROM alerts ORDER BY 1"
                                ).fetchall()
        assert [r[0] for r in rows] == [50, 80]
        posted = sorted(r.body["threshold_percent"] for r in hook.requests
                        if r.path == "/hook")
        assert posted == [50, 80]
    finally:
        hook.stop()


def test_a_call_waiting_for_a_lease_does_not_hold_up_the_others(postgres) -> None:
    """A lease is taken off the event loop: while Postgres is slow to grant one (its
    budget row locked by another session), calls that need none go on, and the calls
    that wait are admitted once it is granted."""
    url = postgres.fresh_database()

    async def main() -> None:
        async with instances(url, 1) as (g,):
            capped, _ = g.create({"name": "capped", "budget_usd": str(COST * 1000)})
            free, _ = g.create({"name": "free", "rpm": 10_000})
            who = Principal("key", g.keys[capped.id])
            other = Principal("key", g.keys[free.id])
            assert await call(g, who)  # the budget's row exists, a first lease is held
            await asyncio.sleep(2 * TICK)
            blocker = await psycopg.AsyncConnection.connect(url)
            try:
                await blocker.execute("BEGIN")
                await blocker.execute("SELECT 1 FROM budget_spend WHERE name = %s FOR UPDATE",
                                      [capped.id])
                # More calls at once than the lease held covers: some must wait for more.
                waiting = [asyncio.create_task(call(g, who)) for _ in range(60)]
                await asyncio.sleep(0.3)
                assert not all(t.done() for t in waiting)
                # Meanwhile the event loop serves calls that lease nothing.
                for _ in range(50):
                    assert (await g.admit_wait(other, "fast", [MINI], REQ, 200, None, None)
                            ) is not None
                assert not all(t.done() for t in waiting)
            finally:
                await blocker.execute("COMMIT")
                await blocker.close()
            assert all(await asyncio.gather(*waiting))  # granted once the row was free

    asyncio.run(main())

"""Three `flowc serve --store` instances on one real Postgres (tests/pgserver.py), a
loopback OpenAI upstream (tests/fakes.py), clients over HTTP: one key's budget, its
revocation and a store outage, as a team behind a load balancer sees them."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from runtime.pg.access import TICK
from tests.conftest import ROOT, start_server, stop_server
from tests.fakes import FakeServer, free_port, wait_until
from tests.keyed import ADMIN

CONFIG = """\
models:
  flat: openai/flat-model
prices:
  openai/flat-model: {input: 0, output: 10}
ledger:
  flush_interval: 0.1
"""
# The upstream's default answer: 10 output tokens at $10 per 1M, so $0.0001 a call; a
# call may ask for 20, so $0.0002 is reserved for it.
COST, WORST = Decimal("0.0001"), Decimal("0.0002")
BUDGET = COST * 50
PROPAGATION = 4 * TICK  # the documented bound for a key change to reach every instance


@dataclass
class Cluster:
    urls: list[str]
    store: str
    procs: list[subprocess.Popen[bytes]]
    upstream: FakeServer

    def admin(self, i: int, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(method, self.urls[i] + path, timeout=10,
                             headers={"authorization": f"Bearer {ADMIN}"}, **kw)

    def key(self, **spec: Any) -> tuple[str, str]:
        r = self.admin(0, "POST", "/v1/keys", json=spec)
        assert r.status_code == 201, r.text
        return r.json()["id"], r.json()["key"]


@pytest.fixture(scope="module")
def cluster(postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    project: Path = tmp_path_factory.mktemp("shared")
    (project / "flowc.yaml").write_text(textwrap.dedent(CONFIG))
    upstream = FakeServer("openai").start()
    store = postgres.fresh_database()
    env = {**{k: v for k, v in os.environ.items() if k != "FLOWC_STORE_URL"},
           "FLOWC_ADMIN_KEY": ADMIN, "PYTHONPATH": str(ROOT),
           "OPENAI_BASE_URL": upstream.url + "/v1", "OPENAI_API_KEY": "sk-test-openai"}
    ports = [free_port() for _ in range(3)]
    with ThreadPoolExecutor(3) as pool:  # started together, as migrations must allow
        procs = list(pool.map(lambda p: start_server(project, env, p, "--store", store),
                              ports))
    c = Cluster([f"http://127.0.0.1:{p}" for p in ports], store, procs, upstream)
    yield c
    for p in procs:
        stop_server(p)
    upstream.stop()


def settled(store: str, key_id: str) -> tuple[Decimal, Decimal]:
    with psycopg.connect(store) as conn:
        row = conn.execute("SELECT coalesce(sum(spent), 0), coalesce(sum(leased), 0) FROM "
                           "budget_spend WHERE kind = 'key' AND name = %s",
                           [key_id]).fetchone()
    assert row is not None
    return row[0], row[1]


def ask(secret: str, stream: bool = False) -> dict[str, Any]:
    return {"json": {"model": "flat", "max_tokens": 20, "stream": stream,
                     "messages": [{"role": "user", "content": "hi"}]},
            "headers": {"authorization": f"Bearer {secret}"}}


def test_one_budget_hammered_on_three_instances_is_never_passed(cluster: Cluster) -> None:
    key_id, secret = cluster.key(name="shared", budget_usd=str(BUDGET))
    wait_until(lambda: all(cluster.admin(i, "GET", f"/v1/keys/{key_id}").status_code == 200
                           for i in range(3)), 10)

    async def hammer() -> list[httpx.Response]:
        limits = asyncio.Semaphore(24)
        async with httpx.AsyncClient(timeout=30) as client:
            async def one(i: int) -> httpx.Response:
                async with limits:
                    return await client.post(f"{cluster.urls[i % 3]}/v1/chat/completions",
                                             **ask(secret, stream=i % 4 == 0))
            return await asyncio.gather(*(one(i) for i in range(150)))

    answers = asyncio.run(hammer())
    served = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code != 200]
    for r in refused:
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "insufficient_quota"
        message = r.json()["error"]["message"]
        assert "budget exceeded for key 'shared'" in message
        # What it says is left is less than what the call might cost (here or, for a
        # call refused while others held slices, what this instance could still get).
        left, worst = re.search(r"\$([\d.]+) left, and this request may cost up to "
                                r"\$([\d.]+)", message).groups()  # type: ignore[union-attr]
        assert Decimal(left) < Decimal(worst) == WORST, message
    # Settled within a few ticks of the last answer (and on shutdown at the latest).
    wait_until(lambda: settled(cluster.store, key_id)[0] == len(served) * COST, 10)
    spent, _ = settled(cluster.store, key_id)
    assert spent <= BUDGET
    # Close to the budget: each instance may stop short by at most what one more call
    # could cost (its last lease too small for another).
    assert spent >= BUDGET - 3 * WORST, (spent, len(served))
    assert len(served) >= 44


def test_a_key_revoked_on_one_instance_is_refused_on_the_others(cluster: Cluster) -> None:
    key_id, secret = cluster.key(name="leaver")
    time.sleep(PROPAGATION)
    for url in cluster.urls:
        r = httpx.post(url + "/v1/chat/completions", timeout=10, **ask(secret))
        assert r.status_code == 200, r.text
    assert cluster.admin(0, "DELETE", f"/v1/keys/{key_id}").status_code == 200
    time.sleep(PROPAGATION)
    for url in cluster.urls[1:]:
        r = httpx.post(url + "/v1/chat/completions", timeout=10, **ask(secret))
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "revoked_api_key"


def test_each_instance_has_one_name_in_every_table(cluster: Cluster) -> None:
    """The name on an instance's ledger rows (hostname:port by default) is the one on its
    budget leases and its liveness row (with a per-process suffix there) and in /ready."""
    _, secret = cluster.key(name="named", budget_usd="1")
    time.sleep(PROPAGATION)
    names = []
    for i, url in enumerate(cluster.urls):
        r = httpx.post(url + "/v1/chat/completions", timeout=10, **ask(secret))
        assert r.status_code == 200, r.text
        ready = cluster.admin(i, "GET", "/ready").json()
        name = ready["ledger"]["instance"]
        assert name == f"{socket.gethostname()}:{url.rsplit(':', 1)[1]}"
        assert ready["access"]["instance"] == name
        assert ready["access"]["process"].startswith(name + "/")
        names.append(name)
    with psycopg.connect(cluster.store) as conn:
        def named(sql: str) -> set[str]:
            return {n for (n,) in conn.execute(sql).fetchall()}

        wait_until(lambda: named("SELECT DISTINCT instance FROM requests") == set(names), 10)
        assert named("SELECT split_part(id, '/', 1) FROM access_instances") == set(names)
        leases = "SELECT split_part(instance, '/', 1) FROM budget_leases"
        for name, url in zip(names, cluster.urls, strict=True):
            # A lease lives while its instance has demand (an idle one hands it back at
            # its next tick): look while the instance serves the key.
            def leased(name: str = name, url: str = url) -> bool:
                httpx.post(url + "/v1/chat/completions", timeout=10, **ask(secret))
                return name in named(leases)

            wait_until(leased, 10)
        assert named(leases) <= set(names)


def test_store_down_a_budgeted_key_is_refused_an_unbudgeted_one_served(
        cluster: Cluster, postgres) -> None:
    _, capped = cluster.key(name="capped", budget_usd="5")
    _, free = cluster.key(name="free")
    time.sleep(PROPAGATION)
    postgres.stop()
    try:
        def all_down() -> bool:
            return all(cluster.admin(i, "GET", "/ready").json()["access"]["reachable"]
                       is False for i in range(3))

        wait_until(all_down, 10)
        ready = cluster.admin(1, "GET", "/ready").json()
        assert ready["status"] == "degraded" and ready["access"]["budgets_on_outage"] == "closed"
        for url in cluster.urls:
            r = httpx.post(url + "/v1/chat/completions", timeout=10, **ask(capped))
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert err["code"] == "budget_store_unavailable"
            assert "key 'capped'" in err["message"] and "retry" in err["message"]
            r = httpx.post(url + "/v1/chat/completions", timeout=10, **ask(free))
            assert r.status_code == 200, r.text
    finally:
        postgres.start()

    def all_up() -> bool:
        return all(cluster.admin(i, "GET", "/ready").json()["access"]["reachable"]
                   for i in range(3))

    wait_until(all_up, 15)
    for url in cluster.urls:
        for secret in (capped, free):
            r = httpx.post(url + "/v1/chat/completions", timeout=10, **ask(secret))
            assert r.status_code == 200, r.text


KEY_CHANGES = [{"rpm": 70}, {"tpm": 9000}, {"budget": "3"}, {"models": "flat"},
               {"read_only": True}, {"tags": ["env=prod"]}, {"expires": "40d"},
               {"pipelines": ["echo"]}, {"team": "ops"}]


def test_changes_to_one_key_sent_to_every_instance_at_once_all_take_effect(
        cluster: Cluster) -> None:
    """Each instance works a change out from the key as it has it, which may be behind
    another instance's change made a moment before: the store refuses that change, and
    it is worked out again from the key as the store has it. None is lost."""
    key_id, _ = cluster.key(name="parallel")
    time.sleep(PROPAGATION)

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30,
                                     headers={"authorization": f"Bearer {ADMIN}"}) as client:
            return await asyncio.gather(*(
                client.patch(f"{cluster.urls[i % 3]}/v1/keys/{key_id}", json=change)
                for i, change in enumerate(KEY_CHANGES)))

    assert [r.status_code for r in asyncio.run(send_all())] == [200] * len(KEY_CHANGES)
    time.sleep(PROPAGATION)
    for i in range(3):
        key = cluster.admin(i, "GET", f"/v1/keys/{key_id}").json()
        assert (key["rpm"], key["tpm"], key["budget_usd"], key["models"], key["read_only"],
                key["tags"], key["pipelines"], key["team"]) == (
            70, 9000, "3", ["flat"], True, ["env=prod"], ["echo"], "ops"), i
        assert key["expires_at"] is not None

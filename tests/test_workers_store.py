"""`flowc serve --workers 2 --store URL` as a user runs it: one supervisor, two worker
processes on one port, each an instance of one real Postgres (tests/pgserver.py), a
loopback OpenAI as the provider. Rows from both workers reach Postgres, each naming its
worker; a budget holds across both; a worker killed with -9 is started again under its
own name and nothing it answered is lost."""

from __future__ import annotations

import asyncio
import os
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import ROOT, start_server, stop_server
from tests.fakes import FakeServer, free_port, openai_text, slow, wait_until
from tests.test_workers import (
    ADMIN,
    ONE_CALL,
    WORKER,
    crowd,
    killed_under_load,
    restarted,
    workers,
)

CONFIG = """\
models:
  fast: openai/gpt-4o-mini
ledger:
  flush_interval: 0.2
"""


@dataclass
class Served:
    url: str
    store: str
    project: Path
    upstream: FakeServer

    @property
    def admin(self) -> dict[str, str]:
        return {"authorization": f"Bearer {ADMIN}"}

    def query(self, sql: str, params: list[object] | None = None) -> list[tuple[object, ...]]:
        with psycopg.connect(self.store) as conn:
            return conn.execute(sql, params or []).fetchall()

    def ok_rows(self) -> int:
        return int(self.query("SELECT count(*) FROM requests WHERE status = 'ok'")[0][0])


@pytest.fixture(scope="module")
def served(postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    project = tmp_path_factory.mktemp("workers-store")
    (project / "flowc.yaml").write_text(textwrap.dedent(CONFIG))
    upstream = FakeServer("openai").start()
    env = {**{k: v for k, v in os.environ.items() if k != "FLOWC_ADMIN_KEY"},
           "FLOWC_ADMIN_KEY": ADMIN, "PYTHONPATH": str(ROOT),
           "OPENAI_BASE_URL": upstream.url + "/v1", "OPENAI_API_KEY": "sk-test-openai"}
    store = postgres.fresh_database()
    port = free_port()
    proc = start_server(project, env, port, "--workers", "2", "--store", store,
                        "--instance", "box")
    yield Served(f"http://127.0.0.1:{port}", store, project, upstream)
    assert stop_server(proc) == 0
    upstream.stop()


def test_both_workers_serve_and_every_answer_is_one_row_in_postgres_naming_its_worker(
        served):
    results = asyncio.run(crowd(served.url, served.admin, 300, 48))
    assert {status for status, _, _ in results} == {200}
    assert len({pid for _, pid, _ in results}) == 2
    wait_until(lambda: served.ok_rows() >= 300, 20)
    assert served.ok_rows() == 300
    by_worker = dict(served.query("SELECT instance, count(*) FROM requests GROUP BY 1"))
    assert set(by_worker) == {"box/w0", "box/w1"}, by_worker
    assert sum(by_worker.values()) == 300
    # Each worker has its own spool folder, under its own name.
    assert {p.name for p in (served.project / ".flowc" / "spool").iterdir()} == {
        "box_w0", "box_w1"}


def test_a_budget_holds_across_both_workers(served):
    budget = ONE_CALL * 20
    made = httpx.post(f"{served.url}/v1/keys", headers=served.admin,
                      json={"name": "crowd", "budget_usd": str(budget)}, timeout=30)
    assert made.status_code == 201, made.text
    key_id, secret = made.json()["id"], made.json()["key"]
    auth = {"authorization": f"Bearer {secret}"}
    seen: set[str] = set()

    def live_on_both() -> bool:  # the other worker reads new keys from the store each tick
        r = httpx.get(f"{served.url}/v1/models", headers=auth, timeout=30)
        if r.status_code == 200:
            seen.add(r.headers[WORKER])
        return len(seen) == 2

    wait_until(live_on_both, 10)
    served.upstream.then(*[slow(0.05, openai_text()) for _ in range(300)])
    results = asyncio.run(crowd(served.url, auth, 300, 64))
    served.upstream.script.clear()
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(ok) + len(refused) == 300, {r[0] for r in results}
    assert len({pid for _, pid, _ in results}) == 2
    assert 6 <= len(ok) <= 20, len(ok)
    for _, _, raw in refused:
        assert b"insufficient_quota" in raw and b"budget exceeded for key 'crowd'" in raw
    wait_until(lambda: len(served.query("SELECT 1 FROM requests WHERE key_id = %s",
                                        [key_id])) >= 300, 20)
    rows = served.query("SELECT status, cost_usd FROM requests WHERE key_id = %s", [key_id])
    assert [r[0] for r in rows].count("ok") == len(ok)
    spent = sum((Decimal(r[1]) for r in rows if r[0] == "ok"), Decimal(0))
    assert spent <= budget
    # Settled in the store within a few ticks: exactly what the rows cost.
    wait_until(lambda: served.query("SELECT spent FROM budget_spend WHERE name = %s",
                                    [key_id])[0][0] == spent, 10)


def test_a_worker_killed_with_9_comes_back_under_its_name_and_loses_nothing(served):
    before_rows, before_up = served.ok_rows(), len(served.upstream.requests)
    victim = sorted(workers(served.url))[0]
    answered = killed_under_load(served.url, served.admin, victim)
    assert answered > 0
    assert victim not in restarted(served.url, victim)
    # What the killed worker answered was in its spool; its successor (the same name,
    # the same spool) sent it.
    wait_until(lambda: served.ok_rows() - before_rows >= answered, 20)
    assert served.ok_rows() - before_rows <= len(served.upstream.requests) - before_up
    names = {r[0] for r in served.query("SELECT DISTINCT instance FROM requests")}
    assert names == {"box/w0", "box/w1"}

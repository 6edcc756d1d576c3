"""`flowc serve --workers 2` as a user runs it: a real server (a supervisor and two worker
processes on one port), a loopback OpenAI as the provider, clients over many connections.
Everything the workers serve behaves as one server: one ledger, keys live on every worker
at once, budgets held across both, a worker killed with -9 started again."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from runtime.ledger.pricing import price
from runtime.providers.base import Usage
from tests.conftest import ROOT, start_server, stop_server
from tests.fakes import FakeServer, free_port, openai_text, slow, wait_until

ADMIN = "sk-flowc-admin-" + "7f3e9a21" * 5
CONFIG = """\
models:
  fast: openai/gpt-4o-mini
ledger:
  flush_interval: 0.2
"""
WORKER = "x-flowc-worker"
ONE_CALL = price("openai", "gpt-4o-mini", Usage(prompt_tokens=19, completion_tokens=10))[0]
assert ONE_CALL is not None


@dataclass
class Served:
    url: str
    project: Path
    env: dict[str, str]
    upstream: FakeServer
    proc: object

    @property
    def admin(self) -> dict[str, str]:
        return {"authorization": f"Bearer {ADMIN}"}

    def upstream_calls(self) -> int:
        return sum(1 for r in self.upstream.requests if r.path == "/v1/chat/completions")

    def sql(self, query: str, params: list[object] | None = None) -> list[list[object]]:
        r = httpx.post(f"{self.url}/v1/costs/sql", json={"sql": query, "params": params or []},
                       headers=self.admin, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["rows"]  # type: ignore[no-any-return]

    def ok_rows(self) -> int:
        return int(self.sql("SELECT count(*) FROM requests WHERE status = 'ok'")[0][0])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    project = tmp_path_factory.mktemp("workers")
    (project / "flowc.yaml").write_text(textwrap.dedent(CONFIG))
    upstream = FakeServer("openai").start()
    env = {**{k: v for k, v in os.environ.items() if k != "FLOWC_ADMIN_KEY"},
           "FLOWC_ADMIN_KEY": ADMIN, "PYTHONPATH": str(ROOT),
           "OPENAI_BASE_URL": upstream.url + "/v1", "OPENAI_API_KEY": "sk-test-openai"}
    port = free_port()
    proc = start_server(project, env, port, "--workers", "2")
    yield Served(f"http://127.0.0.1:{port}", project, env, upstream, proc)
    assert stop_server(proc) == 0
    upstream.stop()


def chat(stream: bool, text: str = "hi") -> dict[str, object]:
    body: dict[str, object] = {"model": "fast", "max_tokens": 10,
                               "messages": [{"role": "user", "content": text}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


async def crowd(url: str, headers: dict[str, str], n: int, connections: int
                ) -> list[tuple[int, str, bytes]]:
    """``n`` calls (plain and streamed in turn) over up to ``connections`` connections:
    each call's status, the worker that answered it, and its body."""
    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, str, bytes]:
        async with client.stream("POST", url + "/v1/chat/completions",
                                 json=chat(bool(i % 2), f"call {i}"), headers=headers) as r:
            return r.status_code, r.headers.get(WORKER, ""), await r.aread()

    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(*(one(client, i) for i in range(n)))


def calls_in_costs(s: Served) -> int:
    """The total `flowc costs` prints (through the running server)."""
    done = subprocess.run([sys.executable, "-m", "runtime.cli", "costs"], cwd=s.project,
                          env=s.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    found = re.search(r"^(\d+) calls,", done.stdout, re.M)
    assert found, done.stdout
    return int(found.group(1))


def workers(url: str) -> set[str]:
    """The pids of both workers (new connections until each has answered)."""
    pids: set[str] = set()
    for _ in range(100):
        pids.add(httpx.get(url + "/health", timeout=10).headers[WORKER])
        if len(pids) == 2:
            return pids
    raise AssertionError(f"only {pids} answered")


def killed_under_load(url: str, headers: dict[str, str], victim: str) -> int:
    """Calls from 8 clients at once; one second in, worker ``victim`` is killed with -9,
    and a second later the load stops: the calls answered in full."""
    async def load(stop: asyncio.Event) -> int:
        n = 0
        async with httpx.AsyncClient(timeout=30) as client:
            while not stop.is_set():
                try:
                    r = await client.post(url + "/v1/chat/completions",
                                          json=chat(n % 2 == 1), headers=headers)
                except httpx.TransportError:  # a call the killed worker had taken
                    continue
                if r.status_code == 200:
                    n += 1
        return n

    async def scenario() -> int:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(load(stop)) for _ in range(8)]
        await asyncio.sleep(1.0)
        os.kill(int(victim), signal.SIGKILL)
        await asyncio.sleep(1.0)  # the survivor serves alone meanwhile
        stop.set()
        return sum(await asyncio.gather(*tasks))

    return asyncio.run(scenario())


def restarted(url: str, victim: str) -> set[str]:
    """The workers that answer once the supervisor has started one in ``victim``'s place."""
    seen: set[str] = set()

    def back() -> bool:
        seen.add(httpx.get(url + "/health", timeout=10).headers[WORKER])
        return len(seen - {victim}) == 2

    wait_until(back, 30)
    return seen


def test_calls_over_many_connections_reach_both_workers_and_each_is_one_ledger_row(served):
    results = asyncio.run(crowd(served.url, served.admin, 600, 48))
    assert {status for status, _, _ in results} == {200}
    workers = {pid for _, pid, _ in results}
    assert len(workers) == 2 and all(p.isdigit() for p in workers), workers
    for i, (_, _, raw) in enumerate(results):  # every answer whole
        assert (b"data: [DONE]" if i % 2 else b'"echo: call ') in raw, raw[:200]
    assert served.upstream_calls() == 600
    # Every row reaches the one ledger (the supervisor's): `flowc costs` counts them all.
    wait_until(lambda: served.ok_rows() >= 600, 20)
    assert served.ok_rows() == 600
    assert calls_in_costs(served) == 600
    cost = served.sql("SELECT sum(cost_usd) FROM requests")[0][0]
    assert Decimal(str(cost)) == ONE_CALL * 600


def test_a_key_made_through_one_worker_works_on_the_other_at_once(served):
    for round_ in range(3):
        made = httpx.post(f"{served.url}/v1/keys", headers=served.admin,
                          json={"name": f"fresh-{round_}"}, timeout=30)
        assert made.status_code == 201, made.text
        maker, secret = made.headers[WORKER], made.json()["key"]
        others = []
        # New connections until the other worker answers: from the first, the key works.
        for _ in range(200):
            r = httpx.post(f"{served.url}/v1/chat/completions", json=chat(False),
                           headers={"authorization": f"Bearer {secret}"}, timeout=30)
            assert r.status_code == 200, (r.headers.get(WORKER), maker, r.text)
            if r.headers[WORKER] != maker:
                others.append(r.headers[WORKER])
                break
        assert others, "the other worker never answered"
        # Revoked through one worker: refused on both at once.
        gone = httpx.delete(f"{served.url}/v1/keys/{made.json()['id']}",
                            headers=served.admin, timeout=30)
        assert gone.status_code == 200, gone.text
        seen = set()
        for _ in range(500):  # new connections until both workers have answered
            r = httpx.post(f"{served.url}/v1/chat/completions", json=chat(False),
                           headers={"authorization": f"Bearer {secret}"}, timeout=30)
            assert r.status_code == 401, r.text
            seen.add(r.headers[WORKER])
            if len(seen) == 2:
                break
        assert len(seen) == 2, seen



def test_changes_to_one_key_sent_through_both_workers_at_once_all_take_effect(served):
    """A change made through one worker while the other changed the key is worked out
    again from the key as it is now (the supervisor refuses it), never saved over the
    other's: every change takes effect. Rounds until both workers took changes."""
    changes = [{"rpm": 70}, {"tpm": 9000}, {"budget": "3"}, {"models": "fast"},
               {"read_only": True}, {"tags": ["env=prod"]}, {"expires": "40d"},
               {"pipelines": ["echo"]}, {"team": "ops"}]

    async def send_all(key_id: str) -> list[httpx.Response]:
        async def one(change: dict[str, object]) -> httpx.Response:
            async with httpx.AsyncClient(timeout=30, headers=served.admin) as client:
                return await client.patch(f"{served.url}/v1/keys/{key_id}", json=change)

        return await asyncio.gather(*(one(c) for c in changes))  # a connection each

    workers: set[str] = set()  # that took the last round's changes
    for round_ in range(10):
        made = httpx.post(f"{served.url}/v1/keys", headers=served.admin,
                          json={"name": f"parallel-{round_}"}, timeout=30)
        assert made.status_code == 201, made.text
        answers = asyncio.run(send_all(made.json()["id"]))
        assert [r.status_code for r in answers] == [200] * len(changes)
        for _ in range(4):  # new connections: what each worker has live
            key = httpx.get(f"{served.url}/v1/keys/{made.json()['id']}",
                            headers=served.admin, timeout=30).json()
            assert (key["rpm"], key["tpm"], key["budget_usd"], key["models"],
                    key["read_only"], key["tags"], key["pipelines"], key["team"]) == (
                70, 9000, "3", ["fast"], True, ["env=prod"], ["echo"], "ops")
            assert key["expires_at"] is not None
        workers = {r.headers[WORKER] for r in answers}
        if len(workers) == 2:
            break
    assert len(workers) == 2, "one worker took every change of every round"


PIPELINE = """\
name: {name}
inputs: {{topic: {{type: string}}}}
steps:
  - {{id: a, type: llm, model: fast, prompt: "say ${{input.topic}}"}}
output: ${{a}}
"""


def test_a_pipeline_registered_through_one_worker_is_served_by_both_at_once(served):
    for name in ("digest", "brief"):
        r = httpx.put(f"{served.url}/v1/workflows/{name}", headers=served.admin,
                      json={"yaml": PIPELINE.format(name=name)}, timeout=30)
        assert r.status_code == 200, r.text
        listed_by = set()
        for _ in range(500):  # new connections until both workers have answered
            r = httpx.get(f"{served.url}/v1/workflows", headers=served.admin, timeout=30)
            assert name in {w["name"] for w in r.json()["workflows"]}, r.headers[WORKER]
            listed_by.add(r.headers[WORKER])
            if len(listed_by) == 2:
                break
        assert len(listed_by) == 2


def test_a_budget_holds_across_both_workers_under_concurrent_load(served):
    budget = ONE_CALL * 20  # what 20 calls really cost
    made = httpx.post(f"{served.url}/v1/keys", headers=served.admin,
                      json={"name": "crowd", "budget_usd": str(budget)}, timeout=30)
    assert made.status_code == 201, made.text
    key_id, secret = made.json()["id"], made.json()["key"]
    served.upstream.then(*[slow(0.05, openai_text()) for _ in range(300)])
    results = asyncio.run(crowd(served.url, {"authorization": f"Bearer {secret}"}, 300, 64))
    served.upstream.script.clear()
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(ok) + len(refused) == 300, {r[0] for r in results}
    assert len({pid for _, pid, _ in results}) == 2  # both workers took part
    # Reserved at their worst case (the prompt's size at the input rate, and max_tokens),
    # 20 calls' real cost lets at least 6 through; never more than 20.
    assert 6 <= len(ok) <= 20, len(ok)
    for _, _, raw in refused:
        assert b"insufficient_quota" in raw and b"budget exceeded for key 'crowd'" in raw
    wait_until(lambda: len(served.sql("SELECT status FROM requests WHERE key_id = ?",
                                      [key_id])) >= 300, 20)
    rows = served.sql("SELECT status, cost_usd FROM requests WHERE key_id = ?", [key_id])
    statuses = [r[0] for r in rows]
    assert statuses.count("ok") == len(ok) and statuses.count("refused") == len(refused)
    spent = sum((Decimal(str(r[1])) for r in rows if r[0] == "ok"), Decimal(0))
    assert spent <= budget

    def shown() -> Decimal:  # each worker settles with the supervisor every tick
        r = httpx.get(f"{served.url}/v1/keys/{key_id}", headers=served.admin, timeout=30)
        return Decimal(r.json()["spend"]["key"]["spent_usd"])

    wait_until(lambda: shown() == spent, 10)
    # Each threshold the spend crossed fired one alert, not one per worker.
    crossed = [t for t in (50, 80, 100) if spent * 100 >= budget * t]
    assert crossed, spent

    def alerted() -> list[int]:
        r = httpx.get(f"{served.url}/v1/alerts", headers=served.admin, timeout=30)
        return sorted(a["threshold"] for a in r.json()["alerts"]
                      if a["scope_name"] == key_id)

    wait_until(lambda: len(alerted()) >= len(crossed), 10)
    assert alerted() == crossed


def test_a_worker_killed_with_9_is_started_again_and_nothing_answered_is_lost(served):
    before_rows, before_up = served.ok_rows(), served.upstream_calls()
    victim, survivor = sorted(workers(served.url))
    answered = killed_under_load(served.url, served.admin, victim)
    assert answered > 0
    # The survivor kept serving; the supervisor started a third process in the victim's
    # place.
    seen = restarted(served.url, victim)
    assert survivor in seen and victim not in seen
    # Every call answered is in the ledger, the killed worker's too (each row leaves a
    # worker as it is recorded); at most the calls it was killed in the middle of went
    # upstream without an answer.
    wait_until(lambda: served.ok_rows() - before_rows >= answered, 20)
    rows = served.ok_rows() - before_rows
    assert answered <= rows <= served.upstream_calls() - before_up


def test_a_rate_limit_holds_across_both_workers(served):
    made = httpx.post(f"{served.url}/v1/keys", headers=served.admin,
                      json={"name": "limited", "rpm": 30}, timeout=30)
    assert made.status_code == 201, made.text
    results = asyncio.run(crowd(served.url, {"authorization": f"Bearer {made.json()['key']}"},
                                120, 32))
    ok = [r for r in results if r[0] == 200]
    limited = [r for r in results if r[0] == 429]
    assert len(ok) == 30 and len(limited) == 90, {r[0] for r in results}
    assert len({pid for _, pid, _ in results}) == 2  # both workers took part
    for _, _, raw in limited:
        assert b"rate limit reached for key 'limited': 30 requests per minute" in raw, raw


def test_a_tokens_per_minute_limit_holds_across_both_workers(served):
    """Calls half a second apart, each on a new connection (so on either worker): a
    key with 290 tokens a minute serves the 10 calls of 29 tokens that fit, whichever
    worker took them, and refuses the next with the tokens named. Each answer's headers
    count what every call before it used, on either worker (a stream's own tokens are
    not known yet when its headers go)."""
    made = httpx.post(f"{served.url}/v1/keys", headers=served.admin,
                      json={"name": "metered", "tpm": 290}, timeout=30)
    assert made.status_code == 201, made.text
    auth = {"authorization": f"Bearer {made.json()['key']}"}
    statuses, pids, remaining = [], set(), []
    for i in range(12):
        r = httpx.post(f"{served.url}/v1/chat/completions", json=chat(bool(i % 2)),
                       headers=auth, timeout=30)
        statuses.append(r.status_code)
        pids.add(r.headers.get(WORKER))
        remaining.append(int(r.headers["x-ratelimit-remaining-tokens"]))
        if r.status_code == 429:
            assert "290 tokens per minute used" in r.text, r.text
        time.sleep(0.5)  # two ticks: the other worker has sent what it counted
    assert statuses == [200] * 10 + [429] * 2, statuses
    assert len(pids) == 2
    used_before = [29 * (i + 1 - i % 2) for i in range(10)]  # plain, streamed, ...
    assert remaining == [290 - u for u in used_before] + [0, 0]


def test_a_worker_killed_while_holding_a_budget_slice_has_it_counted_as_spent(served):
    budget = ONE_CALL * 100_000  # still far from spent when the worker is killed
    made = httpx.post(f"{served.url}/v1/keys", headers=served.admin,
                      json={"name": "sliced", "budget_usd": str(budget)}, timeout=30)
    assert made.status_code == 201, made.text
    key_id, auth = made.json()["id"], {"authorization": f"Bearer {made.json()['key']}"}
    victim = sorted(workers(served.url))[0]
    answered = killed_under_load(served.url, auth, victim)
    assert answered > 0
    restarted(served.url, victim)
    wait_until(lambda: len(served.sql("SELECT 1 FROM requests WHERE key_id = ? AND "
                                      "status = 'ok'", [key_id])) >= answered, 20)
    rows = served.sql("SELECT cost_usd FROM requests WHERE key_id = ? AND status = 'ok'",
                      [key_id])
    rows_spent = sum((Decimal(str(r[0])) for r in rows), Decimal(0))
    assert rows_spent > 0

    def shown() -> Decimal:  # settled with the supervisor within a tick
        r = httpx.get(f"{served.url}/v1/keys/{key_id}", headers=served.admin, timeout=30)
        return Decimal(r.json()["spend"]["key"]["spent_usd"])

    # The killed worker may have spent what it held and not yet settled (its rows are in
    # the ledger): all it held counts as spent, so the budget counts at least what every
    # answered call cost, and can never be passed by what it spent unseen.
    wait_until(lambda: shown() >= rows_spent, 10)
    assert shown() <= budget

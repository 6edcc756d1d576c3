"""The link between `flowc serve --workers N`'s supervisor (runtime/workers/hub.py) and its
workers (runtime/workers/link.py) when something goes wrong: the supervisor gone, the
ledger slow, a message that cannot be read. Real processes and real Unix sockets; a
stand-in only for a peer that sends what a real one never would."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from decimal import Decimal
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest

from flowc.config import ProjectConfig
from runtime.access.keys import make
from runtime.ledger.store import CallRecord, LedgerUnavailable, _fields_of
from runtime.workers.hub import Hub
from runtime.workers.link import HubStore
from tests.conftest import ROOT, start_server, stop_server
from tests.fakes import FakeServer, free_port, wait_until
from tests.test_workers import PIPELINE, WORKER

ADMIN = "sk-flowc-admin-" + "5c1d7e40" * 5
ROWS = 3000  # rows a worker sends in a burst (more than its socket holds)
CONFIG = """\
models:
  fast: openai/gpt-4o-mini
ledger:
  flush_interval: 0.2
"""
HUB = """\
import os, signal, sys
from runtime.cli import load_project
from runtime.workers.hub import Hub
cfg, project = load_project(None)
hub = Hub(cfg, project, sys.argv[1], bytes.fromhex(sys.argv[2]), os.environ["FLOWC_ADMIN_KEY"])
print("ready", flush=True)
signal.pause()
"""
WORKER_MAIN = """\
import sys
from runtime.workers.worker import ServeArgs, run
run(ServeArgs("127.0.0.1", int(sys.argv[3]), None, None, "warning", (), (), None), None,
    sys.argv[1], bytes.fromhex(sys.argv[2]))
"""


@pytest.fixture
def upstream() -> Iterator[FakeServer]:
    fake = FakeServer("openai").start()
    yield fake
    fake.stop()


def project_env(project: Path, upstream: FakeServer) -> dict[str, str]:
    """A project served with the admin key, calling ``upstream`` for OpenAI; its env."""
    (project / "flowc.yaml").write_text(textwrap.dedent(CONFIG))
    return {**{k: v for k, v in os.environ.items() if k != "FLOWC_ADMIN_KEY"},
            "FLOWC_ADMIN_KEY": ADMIN, "PYTHONPATH": str(ROOT),
            "OPENAI_BASE_URL": upstream.url + "/v1", "OPENAI_API_KEY": "sk-test-openai"}


def test_a_worker_that_lost_its_supervisor_refuses_a_rate_limited_call_with_a_503(
        tmp_path, upstream):
    """The supervisor counts every rate limit for all workers; a worker that cannot reach
    it cannot check one: the call is refused in the API's error shape, asking to retry,
    and recorded as refused (not a 500 with a traceback)."""
    env = project_env(tmp_path, upstream)
    address, authkey, port = str(tmp_path / "hub.sock"), os.urandom(32).hex(), free_port()
    hub = subprocess.Popen([sys.executable, "-c", HUB, address, authkey], cwd=tmp_path,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    worker = None
    try:
        assert hub.stdout is not None and hub.stdout.readline() == b"ready\n"
        # Its own process, not the supervisor's child: it outlives the supervisor.
        worker = subprocess.Popen([sys.executable, "-c", WORKER_MAIN, address, authkey, str(port)],
                                  cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        url, admin = f"http://127.0.0.1:{port}", {"authorization": f"Bearer {ADMIN}"}

        def up() -> bool:
            assert worker is not None and worker.poll() is None
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 60)
        made = httpx.post(url + "/v1/keys", headers=admin, timeout=30,
                          json={"name": "limited", "rpm": 30})
        assert made.status_code == 201, made.text
        auth = {"authorization": f"Bearer {made.json()['key']}"}
        body = {"model": "fast", "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=auth, timeout=30)
        assert r.status_code == 200, r.text

        def on_the_books() -> bool:
            r = httpx.post(url + "/v1/costs/sql", headers=admin, timeout=30,
                           json={"sql": "SELECT count(*) FROM requests"})
            return r.json()["rows"] == [[1]]

        wait_until(on_the_books, 20)
        hub.kill()
        hub.wait(10)
        for _ in range(20):  # answered while the supervisor was still going down: again
            r = httpx.post(url + "/v1/chat/completions", json=body, headers=auth, timeout=30)
            if r.status_code != 200:
                break
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "rate_limit_store_unavailable"
        assert error["message"] == (
            "The server is temporarily unable to check the rate limits of key 'limited': "
            "this worker has lost its supervisor. Please retry your request after a brief "
            "wait.")
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=30)
        assert b"Traceback" not in out, out.decode()
    finally:
        for p in (hub, worker):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
    # The refusal is on the books: in a segment of the ledger's inbox (its owner was gone),
    # which the next process to hold the ledger takes in.
    inbox = tmp_path / ".flowc" / "ledger.duckdb.inbox"
    rows = duckdb.sql(f"SELECT key_name, error FROM read_parquet('{inbox}/*.parquet') "
                      "WHERE status = 'refused'").fetchall()
    assert len(rows) == 1 and rows[0][0] == "limited"
    assert "rate limits of key 'limited'" in rows[0][1]


# -- in this process: a real Hub, reached as workers reach it -------------------------------

def hub_in(tmp_path: Path) -> tuple[Hub, str, bytes]:
    address, authkey = str(tmp_path / "hub.sock"), os.urandom(32)
    return Hub(ProjectConfig(), tmp_path, address, authkey, None), address, authkey


def acking(pushes: list[tuple[Any, ...]]) -> tuple[list[HubStore], Any]:
    """A worker's answer to a pushed key change: live at once (acknowledged)."""
    holder: list[HubStore] = []

    def on_push(message: tuple[Any, ...]) -> None:
        pushes.append(message)
        if message[0] == "key":
            holder[0].post("ack", message[1])

    return holder, on_push


async def admissions(store: HubStore) -> int:
    """Rate-limit checks through ``store`` for a second, each answered: how many."""
    n, loop = 0, asyncio.get_running_loop()
    until = loop.time() + 1.0
    while loop.time() < until:
        got = await asyncio.wait_for(
            store.call_async("slots", [("key", "k", 1, 0, 0.0)]), 30)
        assert got == ("ok", [None])  # a window not configured: nothing to count
        n += 1
    return n


def test_a_key_change_waiting_on_the_ledger_holds_up_no_other_workers_calls(tmp_path):
    """A new budget's spend so far is summed from the ledger, which may be slow (here its
    process is stopped): meanwhile every other worker's rate-limit checks are answered."""
    hub, address, authkey = hub_in(tmp_path)
    pushes: list[tuple[Any, ...]] = []
    holder, on_push = acking(pushes)
    saver = HubStore(address, authkey, lambda m: None)
    other = HubStore(address, authkey, on_push)
    holder.append(other)
    ledger_process = hub.ledger._store.pid  # type: ignore[union-attr]
    assert ledger_process is not None
    key, _ = make({"name": "capped", "budget_usd": "5"})
    saving = threading.Thread(target=saver.call, args=("key", key, None))
    os.kill(ledger_process, signal.SIGSTOP)
    try:
        saving.start()
        # The key change waits on the ledger all along.
        assert asyncio.run(admissions(other)) > 0
    finally:
        os.kill(ledger_process, signal.SIGCONT)
    saving.join(30)
    assert not saving.is_alive()
    # The change went live with its budget, and reached the other worker.
    status = hub.gate.budget_status(key)["key"]
    assert Decimal(status["limit_usd"]) == 5 and Decimal(status["spent_usd"]) == 0
    assert [m[0] for m in pushes] == ["key"] and pushes[0][2].id == key.id
    for store in (saver, other):
        store.close()
    hub.close()


def test_rate_limit_slots_leased_to_two_workers_never_add_up_past_the_limit(tmp_path):
    """Two workers lease request slots for a 40-a-minute key as fast as they can: the
    leases add up to exactly 40, each at least one slot and never most of what is left,
    then the supervisor refuses; slots handed back unused can be leased again."""
    hub, address, authkey = hub_in(tmp_path)
    try:
        key, _ = hub.gate.create({"name": "limited", "rpm": 40})
        stores = [HubStore(address, authkey, lambda m: None) for _ in range(2)]
        wait_until(lambda: hub.workers() == 2)
        leases: list[tuple[int, float]] = []
        refused = 0
        while refused < 4:
            for store in stores:
                got = store.call("slots", [("key", key.id, 100, 0, 0.0)])
                if got[0] == "limited":
                    refused += 1
                    assert "rate limit reached for key 'limited': 40 requests per minute" in got[1]
                    continue
                (slots, at, left, *_), = got[1]
                assert slots >= 1 and (slots == 1 or slots <= (left + slots) // 16)
                leases.append((slots, at))
        assert sum(n for n, _ in leases) == 40
        assert any(n > 1 for n, _ in leases)  # far from the limit, more than one at once
        n, at = next((n, at) for n, at in leases if n > 1)
        stores[0].post("unslot", "key", key.id, at, n)
        wait_until(lambda: stores[1].call("slots", [("key", key.id, 1, 0, 0.0)])[0] == "ok")
        for store in stores:
            store.close()
    finally:
        hub.close()


def test_pipelines_registered_through_every_worker_at_once_are_served_by_all_at_once(
        tmp_path, upstream):
    """Each of 4 workers registering pipelines at the same moment: every registration is
    answered once all workers serve it, none waits for a confirmation in vain."""
    env = project_env(tmp_path, upstream)
    port = free_port()
    url, admin = f"http://127.0.0.1:{port}", {"authorization": f"Bearer {ADMIN}"}
    names = [f"p{i}" for i in range(24)]
    # One SO_REUSEPORT socket each: the kernel spreads the connections over all 4.
    proc = start_server(tmp_path, env, port, "--workers", "4", "--listen", "reuseport")
    try:
        seen: set[str] = set()
        wait_until(lambda: seen.add(httpx.get(url + "/health", timeout=10).headers[WORKER])
                   or len(seen) == 4, 60)  # all 4 listening

        async def register() -> list[httpx.Response]:
            limits = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                return await asyncio.gather(*(
                    client.put(f"{url}/v1/workflows/{n}", headers=admin,
                               json={"yaml": PIPELINE.format(name=n)}) for n in names))

        for r in asyncio.run(register()):
            assert r.status_code == 200, r.text
        listed_by = set()
        for _ in range(1000):  # new connections until every worker has answered
            r = httpx.get(url + "/v1/workflows", headers=admin, timeout=30)
            assert set(names) <= {w["name"] for w in r.json()["workflows"]}, r.headers[WORKER]
            listed_by.add(r.headers[WORKER])
            if len(listed_by) == 4:
                break
        assert len(listed_by) == 4
    finally:
        assert stop_server(proc) == 0
    assert proc.stdout is not None
    log = proc.stdout.read().decode()
    assert "did not confirm" not in log, log


def test_rows_a_worker_sent_are_written_before_its_link_closes_and_before_the_hub_closes(
        tmp_path):
    hub, address, authkey = hub_in(tmp_path)
    row = _fields_of(CallRecord("fast", "openai", "gpt-4o-mini", True, 1.0, status="ok"))
    # A worker stopping: its link's last round trip is answered once every row it sent
    # is written (the ledger writes once a second): readable at once.
    store = HubStore(address, authkey, lambda m: None)
    for _ in range(ROWS):
        store.post("row", row)
    store.close()
    reader = HubStore(address, authkey, lambda m: None)
    assert reader.call("select", "SELECT count(*) FROM requests", [], None)[1] == [(ROWS,)]
    reader.close()
    # A worker gone without a word, rows still in its socket: the supervisor reads them
    # all before it lets the ledger go.
    conn = Client(address, family="AF_UNIX", authkey=authkey)
    for _ in range(ROWS):
        conn.send(("row", row))
    conn.close()
    hub.close()
    with duckdb.connect(str(tmp_path / ".flowc" / "ledger.duckdb")) as con:
        assert con.execute("SELECT count(*) FROM requests").fetchone() == (2 * ROWS,)


def test_a_message_the_worker_cannot_read_fails_its_calls_and_lets_the_connection_go(
        tmp_path):
    address, authkey = str(tmp_path / "hub.sock"), os.urandom(32)
    with Listener(address, family="AF_UNIX", authkey=authkey) as listener:
        accepted: list[Any] = []
        accepting = threading.Thread(target=lambda: accepted.append(listener.accept()))
        accepting.start()
        pushes: list[tuple[Any, ...]] = []
        store = HubStore(address, authkey, pushes.append)
        accepting.join(30)
        supervisor = accepted[0]

        async def scenario() -> None:
            call = asyncio.ensure_future(store.call_async("flush"))
            assert await asyncio.to_thread(supervisor.recv) == ("flush", 1)
            supervisor.send_bytes(b"\x80\x05not a pickle")
            with pytest.raises(LedgerUnavailable):
                await asyncio.wait_for(call, 30)  # failed, instead of waiting forever

        asyncio.run(scenario())
        assert not store.alive and pushes == [("gone",)]
        with pytest.raises(LedgerUnavailable):
            store.call("flush")
        with pytest.raises(EOFError):
            supervisor.recv()  # the worker let the connection go
        supervisor.close()


def test_a_message_the_supervisor_cannot_read_closes_that_workers_connection(
        tmp_path, caplog):
    hub, address, authkey = hub_in(tmp_path)
    try:
        with caplog.at_level(logging.ERROR, logger="flowc.workers"):
            conn = Client(address, family="AF_UNIX", authkey=authkey)
            wait_until(lambda: hub.workers() == 1)
            conn.send_bytes(b"\x80\x05not a pickle")
            with pytest.raises(EOFError):
                conn.recv()
            wait_until(lambda: hub.workers() == 0)
        assert "a message from a worker could not be read" in caplog.text
        conn.close()
        # The others go on: a new connection is answered.
        store = HubStore(address, authkey, lambda m: None)
        assert store.call("slots", [("key", "k", 1, 0, 0.0)]) == ("ok", [None])
        store.close()
    finally:
        hub.close()


def test_a_call_given_up_on_leaves_the_link_answering_the_others(tmp_path):
    """A request whose client went away stops waiting for its answer from the supervisor
    (here a query held up by a stopped ledger process); when the answer comes it is
    dropped, and the worker's later calls are answered as before."""
    hub, address, authkey = hub_in(tmp_path)
    store = HubStore(address, authkey, lambda m: None)
    ledger_process = hub.ledger._store.pid  # type: ignore[union-attr]
    assert ledger_process is not None

    async def scenario() -> int:
        os.kill(ledger_process, signal.SIGSTOP)
        try:
            query = asyncio.ensure_future(store.call_async("select", "SELECT 1", [], None))
            await asyncio.sleep(0)  # sent
            query.cancel()
            with pytest.raises(asyncio.CancelledError):
                await query
        finally:
            os.kill(ledger_process, signal.SIGCONT)
        return await admissions(store)  # the query's answer arrives meanwhile

    assert asyncio.run(scenario()) > 0
    assert store.alive
    store.close()
    hub.close()


def test_calls_waiting_when_the_supervisor_goes_have_failed_before_the_worker_is_told(
        tmp_path):
    """A worker told its supervisor is gone checks whether it was orphaned (for up to
    5 s) before it stops: the calls waiting have failed by then, none waits for that."""
    address, authkey = str(tmp_path / "hub.sock"), os.urandom(32)
    pending: list[Future[Any]] = []
    told: list[tuple[tuple[Any, ...], bool]] = []
    with Listener(address, family="AF_UNIX", authkey=authkey) as listener:
        accepted: list[Any] = []
        accepting = threading.Thread(target=lambda: accepted.append(listener.accept()))
        accepting.start()
        store = HubStore(address, authkey, lambda m: told.append((m, pending[0].done())))
        accepting.join(30)
        supervisor = accepted[0]
        pending.append(store._request("flush"))
        assert supervisor.recv() == ("flush", 1)
        supervisor.close()
        with pytest.raises(LedgerUnavailable):
            pending[0].result(30)
        wait_until(lambda: bool(told))
    assert told == [(("gone",), True)]

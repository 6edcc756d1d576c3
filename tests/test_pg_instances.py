"""Three `flowc serve` instances on one Postgres (docs/scaling.md), each a real process on a
loopback port, against a loopback upstream: every answered request is exactly one ledger
row, whichever instance served it; any instance (and a laptop with the URL) reports the
totals of all; an instance killed with -9 loses nothing it answered; Postgres down for ten
seconds loses nothing either, and `/ready` says where the rows wait meanwhile.

Each request carries its own tag (`x-flowc-tags: r=<n>`), so the test checks the ledger
request by request, not only by count."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import psycopg
import pytest

from tests.conftest import ROOT, start_server, stop_server
from tests.fakes import FakeServer, free_port, wait_until

CONFIG = """\
models:
  fast: openai/gpt-4o-mini
providers:
  openai: {timeout: 5}
ledger:
  flush_interval: 0.2
"""
CONCURRENCY = 48


@dataclass
class Cluster:
    project: Path
    url: str  # the shared store
    upstream: FakeServer
    env: dict[str, str]
    ports: list[int]
    procs: list[subprocess.Popen] = field(default_factory=list)
    tags: itertools.count = field(default_factory=lambda: itertools.count(1))

    def base(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def start(self, i: int) -> None:
        self.procs[i] = start_server(self.project, self.env, self.ports[i], "--store",
                                     self.url, "--instance", f"i{i}")

    def rows(self, where: str = "TRUE") -> int:
        with psycopg.connect(self.url) as conn:
            return conn.execute(f"SELECT count(*) FROM requests WHERE {where}").fetchone()[0]

    def tagged(self) -> dict[str, int]:
        """Ledger rows per request tag."""
        with psycopg.connect(self.url) as conn:
            return dict(conn.execute("SELECT tags, count(*) FROM requests GROUP BY 1"
                                     ).fetchall())

    def flowc(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=self.project,
                              env=self.env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def cluster(postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    project = tmp_path_factory.mktemp("cluster")
    (project / "flowc.yaml").write_text(textwrap.dedent(CONFIG))
    upstream = FakeServer("openai").start()
    env = {**os.environ, "OPENAI_BASE_URL": upstream.url + "/v1",
           "OPENAI_API_KEY": "sk-test-openai", "PYTHONPATH": str(ROOT)}
    env.pop("FLOWC_ADMIN_KEY", None)
    c = Cluster(project, postgres.fresh_database(), upstream, env,
                [free_port() for _ in range(3)], [None, None, None])  # type: ignore[list-item]
    try:
        for i in range(3):
            c.start(i)
        yield c
    finally:
        for p in c.procs:
            if p is not None and p.poll() is None:
                stop_server(p)
        upstream.stop()


async def _one(session: aiohttp.ClientSession, base: str, tag: str, stream: bool) -> bool:
    """One chat completion; True when it was answered in full."""
    body: dict[str, object] = {"model": "fast",
                               "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    try:
        async with session.post(f"{base}/v1/chat/completions", json=body,
                                headers={"x-flowc-tags": tag}) as r:
            text = await r.text()
            if r.status != 200:
                return False
            return text.rstrip().endswith("data: [DONE]") if stream else "choices" in text
    except (TimeoutError, aiohttp.ClientError):
        return False


async def _load(c: Cluster, n: int, bases: list[str], answered: list[str],
                during: object = None, by: dict[str, int] | None = None,
                stop_with: bool = False) -> None:
    """``n`` requests round-robin over ``bases`` (every other one streamed),
    `CONCURRENCY` at a time; the tags of those answered go to ``answered``. ``during``:
    a coroutine run beside the load (a kill, an outage), which ends the load when it ends
    with ``stop_with`` set; ``by``: answers per base URL."""
    queue = iter(range(n))
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        async def worker() -> None:
            for k in queue:
                if stop_with and stop is not None and stop.done():
                    return
                tag, base = f"r={next(c.tags)}", bases[k % len(bases)]
                if await _one(session, base, tag, stream=k % 2 == 1):
                    answered.append(tag)
                    if by is not None:
                        by[base] = by.get(base, 0) + 1

        stop = asyncio.ensure_future(during) if during is not None else None  # type: ignore[arg-type]
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        if stop is not None:
            await stop


def _settled(c: Cluster, answered: list[str], timeout: float = 60) -> dict[str, int]:
    """Once every answered request has its row: rows per tag."""
    want = set(answered)
    rows: dict[str, int] = {}

    def arrived() -> bool:
        nonlocal rows
        rows = c.tagged()
        return want <= rows.keys()

    try:
        wait_until(arrived, timeout)
    except TimeoutError:
        missing = sorted(want - rows.keys())
        raise AssertionError(f"{len(missing)} answered requests have no ledger row, "
                             f"e.g. {missing[:5]}") from None
    return rows


def test_30000_requests_over_three_instances_are_one_row_each(cluster: Cluster) -> None:
    c = cluster
    c.upstream.requests.clear()
    before = c.rows()
    answered: list[str] = []
    asyncio.run(_load(c, 30_000, [c.base(i) for i in range(3)], answered))
    assert len(answered) == 30_000
    rows = _settled(c, answered)
    assert all(rows[t] == 1 for t in answered)  # exactly one row each
    assert c.rows() - before == 30_000 == len(c.upstream.requests)
    with psycopg.connect(c.url) as conn:
        per = dict(conn.execute("SELECT instance, count(*) FROM requests GROUP BY 1"))
    assert per == {"i0": 10_000, "i1": 10_000, "i2": 10_000}
    # Any instance reports everyone's rows; so does a laptop with the URL.
    for i in range(3):
        r = httpx.get(c.base(i) + "/v1/costs/summary", params={"by": "model"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["totals"]["calls"] == c.rows()
    out = c.flowc("costs", "--json", "--store", c.url)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["totals"]["calls"] == c.rows()
    out = c.flowc("costs", "--store", c.url, "--sql",
                  "SELECT instance, count(*) AS calls FROM requests GROUP BY 1 ORDER BY 1")
    assert out.returncode == 0, out.stderr
    assert "i0" in out.stdout and "10000" in out.stdout
    out = c.flowc("costs", "--store", c.url, "--sql", "DELETE FROM requests")
    assert out.returncode == 1 and "only SELECT" in out.stderr


def test_an_instance_killed_under_load_loses_nothing_it_answered(cluster: Cluster) -> None:
    c = cluster
    answered: list[str] = []
    after_kill: list[str] = []
    by: dict[str, int] = {}

    async def kill() -> None:
        while by.get(c.base(2), 0) < 200:  # killed under load, a fifth into its share
            await asyncio.sleep(0.01)
        os.killpg(c.procs[2].pid, signal.SIGKILL)
        c.procs[2].wait(5)
        killed.set()

    killed = asyncio.Event()

    async def run() -> None:
        await _load(c, 3_000, [c.base(i) for i in range(3)], answered, kill(), by)
        # the other two keep serving
        await _load(c, 600, [c.base(0), c.base(1)], after_kill)

    asyncio.run(run())
    assert killed.is_set()
    assert len(after_kill) == 600
    assert 0 < by[c.base(2)] < 1_000  # it answered some, then died
    assert len(answered) < 3_000
    c.start(2)  # the same instance id: the same spool
    rows = _settled(c, answered + after_kill)
    assert all(rows[t] == 1 for t in answered + after_kill)
    ready = httpx.get(c.base(2) + "/ready", timeout=10).json()
    assert ready["ledger"]["instance"] == "i2"


def test_postgres_down_for_ten_seconds_loses_nothing(cluster: Cluster, postgres) -> None:
    c = cluster
    answered: list[str] = []
    seen: list[dict[str, object]] = []
    marks: list[int] = []  # requests answered when Postgres stopped, and when it restarted

    async def outage() -> None:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(postgres.stop)
        marks.append(len(answered))
        try:
            deadline = time.monotonic() + 10
            async with httpx.AsyncClient() as client:
                while time.monotonic() < deadline:
                    r = await client.get(c.base(0) + "/ready", timeout=5)
                    seen.append(r.json()["ledger"] | {"status": r.json()["status"]})
                    await asyncio.sleep(1)
        finally:
            marks.append(len(answered))
            await asyncio.to_thread(postgres.start)
            await asyncio.sleep(0.5)

    before = len(c.upstream.requests)
    # the load goes on until Postgres has been down 10 s and is back
    asyncio.run(_load(c, 1_000_000, [c.base(i) for i in range(3)], answered, outage(),
                      stop_with=True))
    assert len(answered) == len(c.upstream.requests) - before  # every request answered
    assert marks[1] - marks[0] > 100  # ... while Postgres was down
    down = [s for s in seen if not s["connected"]]
    assert down, seen
    assert max(int(s["spooled_rows"]) for s in down) > 0  # type: ignore[call-overload]
    assert all(s["owner"] is False and s["error"] for s in down)
    rows = _settled(c, answered)
    assert all(rows[t] == 1 for t in answered)
    wait_until(lambda: httpx.get(c.base(0) + "/ready", timeout=5).json()["ledger"]
               ["connected"], 30)


def test_a_pipeline_registered_on_one_instance_is_served_by_all(cluster: Cluster) -> None:
    c = cluster
    good = "name: shared\nsteps:\n  - {id: a, type: llm, model: fast, prompt: hi}\noutput: ${a}\n"
    r = httpx.put(f"{c.base(0)}/v1/workflows/shared", json={"yaml": good}, timeout=30)
    assert r.status_code == 200 and r.json()["registered"] is True

    def served_by_all() -> bool:
        return all(any(w["name"] == "shared" for w in httpx.get(
            f"{c.base(i)}/v1/workflows", timeout=10).json()["workflows"]) for i in (1, 2))

    wait_until(served_by_all, 15)
    r = httpx.post(f"{c.base(1)}/v1/workflow/shared", json={"input": {}}, timeout=60)
    assert r.status_code == 200 and r.json()["output"] == "echo: hi", r.text
    run_id = r.json()["run_id"]
    # the run record and its call are on the shared store, readable from another instance
    record = httpx.get(f"{c.base(2)}/v1/runs/{run_id}", timeout=10)
    assert record.status_code == 200 and record.json()["run_id"] == run_id
    listed = c.flowc("runs", "--store", c.url)
    assert listed.returncode == 0 and run_id in listed.stdout, listed.stderr
    assert c.rows(f"run_id = '{run_id}' AND instance = 'i1'") == 1
    dash = httpx.get(f"{c.base(2)}/v1/costs/dashboard", timeout=30).json()
    assert dash["overall"]["calls"] == c.rows()
    csv_text = httpx.get(f"{c.base(0)}/v1/costs/export.csv", timeout=60).text
    assert len(csv_text.splitlines()) == c.rows() + 1
    # spend by the instance that served it, from any instance and from the CLI
    by = httpx.get(f"{c.base(2)}/v1/costs/summary", params={"by": "instance"},
                   timeout=30).json()
    counts = {r["key"]: r["calls"] for r in by["rows"]}
    assert set(counts) <= {"i0", "i1", "i2"} and counts["i1"] == c.rows("instance = 'i1'")
    assert sum(counts.values()) == c.rows()
    one = c.flowc("costs", "--store", c.url, "--instance", "i1", "--json")
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["totals"]["calls"] == counts["i1"]
    table = c.flowc("costs", "--store", c.url, "--by", "instance")
    assert table.returncode == 0 and "i1" in table.stdout, table.stderr

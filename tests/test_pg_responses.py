"""`previous_response_id` across `flowc serve --store` instances on one real Postgres
(tests/pgserver.py): a response made on one instance is followed up on the other, turn
after turn, translated to a loopback Anthropic that is sent the whole conversation each
time; it outlives a restart. And the table's bounds (age, count) on the real database."""

from __future__ import annotations

import asyncio
import os
import subprocess
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from runtime.gateway.responses_store import ResponsesUnavailable
from runtime.pg.responses import PgResponses
from tests.conftest import ROOT, start_server, stop_server
from tests.fakes import FakeServer, free_port
from tests.responses_chain import CONFIG, respond, turn


@dataclass
class Pair:
    project: Path
    store: str
    env: dict[str, str]
    ports: list[int]
    procs: list[subprocess.Popen[bytes]]
    upstream: FakeServer

    def base(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def start(self, i: int) -> subprocess.Popen[bytes]:
        return start_server(self.project, self.env, self.ports[i], "--store", self.store,
                            "--instance", f"i{i}")


@pytest.fixture(scope="module")
def pair(postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    project = tmp_path_factory.mktemp("responses-shared")
    (project / "flowc.yaml").write_text(textwrap.dedent(CONFIG))
    upstream = FakeServer("anthropic").start()
    env = {**{k: v for k, v in os.environ.items()
              if k not in ("FLOWC_STORE_URL", "FLOWC_ADMIN_KEY")},
           "ANTHROPIC_BASE_URL": upstream.url, "ANTHROPIC_API_KEY": "sk-ant-test",
           "PYTHONPATH": str(ROOT)}
    p = Pair(project, postgres.fresh_database(), env, [free_port(), free_port()], [],
             upstream)
    with ThreadPoolExecutor(2) as pool:  # started together, as migrations must allow
        p.procs = list(pool.map(p.start, range(2)))
    yield p
    for proc in p.procs:
        stop_server(proc)
    upstream.stop()


def test_a_follow_up_sent_to_the_other_instance_is_answered(pair):
    rid, _ = turn(pair.upstream, pair.base(0), 0, None)
    for i in range(1, 7):  # each turn on the other instance, plain and streamed in turn
        rid, _ = turn(pair.upstream, pair.base(i % 2), i, rid, stream=bool(i % 3 == 1))
    with psycopg.connect(pair.store) as conn:
        kept = conn.execute("SELECT items FROM responses WHERE id = %s", [rid]).fetchone()[0]
    assert [item.get("role") for item in kept] == ["user", "assistant"] * 7


def test_a_response_outlives_the_restart_of_the_instance_that_made_it(pair):
    rid, _ = turn(pair.upstream, pair.base(0), 0, None)
    stop_server(pair.procs[0])
    pair.procs[0] = pair.start(0)
    turn(pair.upstream, pair.base(0), 1, rid)
    turn(pair.upstream, pair.base(1), 1, rid)


def test_an_unknown_previous_response_is_not_found(pair):
    status, body, _, _ = respond(pair.base(1), 1, "resp_never_made", stream=False)
    assert status == 400 and "previous_response_not_found" in body


def test_the_table_keeps_responses_younger_than_its_age_and_only_the_newest(postgres):
    store = postgres.fresh_database()
    kept = PgResponses(store, retain_days=30, max_rows=3)
    item = [{"type": "message", "role": "user", "content": "x"}]

    async def fill() -> None:
        for i in range(6):
            await kept.remember(f"resp_{i}", item)

    try:
        asyncio.run(fill())
        with psycopg.connect(store, autocommit=True) as conn:
            conn.execute("UPDATE responses SET created_at = now() - interval '31 days' "
                         "WHERE id = 'resp_5'")
        # Past its age: not answered, even before a sweep drops it.
        assert asyncio.run(kept.recall("resp_5")) is None
        assert asyncio.run(kept.recall("resp_0")) == item
        assert kept.sweep() == 3  # resp_5 by age, then all but the newest 3
        with psycopg.connect(store) as conn:
            left = [r[0] for r in conn.execute("SELECT id FROM responses ORDER BY id")]
        assert left == ["resp_2", "resp_3", "resp_4"]
        assert asyncio.run(kept.recall("resp_0")) is None
    finally:
        kept.close()


def test_an_unreachable_store_is_a_503_to_retry_and_an_answer_still_goes_out(caplog):
    gone = PgResponses(f"postgresql://postgres@127.0.0.1:{free_port()}/none")
    try:
        with pytest.raises(ResponsesUnavailable) as err:
            asyncio.run(gone.recall("resp_1"))
        assert err.value.status == 503
        assert err.value.to_openai()["error"]["code"] == "response_store_unavailable"
        assert "Please retry" in err.value.message
        asyncio.run(gone.remember("resp_1", [{"role": "user", "content": "x"}]))  # no raise
        assert "response resp_1 not kept" in caplog.text
    finally:
        gone.close()

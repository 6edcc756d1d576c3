"""The CLI's commands with a shared store (`--store URL`, FLOWC_STORE_URL or flowc.yaml's
`store:`), on a real Postgres (tests/pgserver.py) against a loopback OpenAI upstream: each
reads and writes the store, never the project's own ledger file (which the instances do not
read). Keys made by `flowc keys` are honoured by a running `flowc serve --store`; `flowc run`
(and `--resume`, `flowc runs approve`) leave their ledger rows and run records there, and
its step cache is the store's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import ROOT, start_server, stop_server
from tests.fakes import FakeServer, free_port, json_body, openai_text, wait_until
from tests.keyed import ADMIN
from tests.test_dsl_approval import PIPELINE, answers

CONFIG = """\
models:
  fast: openai/gpt-4o-mini
  flat: openai/flat-model
prices:
  openai/flat-model: {input: 0, output: 10}
retry: {attempts: 0}
ledger: {flush_interval: 0.1}
"""
TWO_STEPS = """\
name: two-steps
steps:
  - {id: a, type: llm, model: fast, prompt: first}
  - {id: b, type: llm, model: fast, prompt: "second after ${a}"}
output: ${b}
"""
CLI = f"{socket.gethostname()}:cli"  # the instance name of a command's rows


@dataclass
class Project:
    folder: Path
    store: str
    env: dict[str, str]  # no FLOWC_STORE_URL: each test says where the store comes from
    upstream: FakeServer

    def flowc(self, *args: str, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=self.folder,
                              env=env or self.env, capture_output=True, text=True,
                              timeout=120)

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.store) as conn:
            return conn.execute(sql, params).fetchall()

    @property
    def local_ledger(self) -> Path:
        return self.folder / ".flowc" / "ledger.duckdb"


@pytest.fixture
def project(postgres, tmp_path: Path) -> Iterator[Project]:
    (tmp_path / "flowc.yaml").write_text(CONFIG)
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / PIPELINE.name).write_text(PIPELINE.read_text())
    (tmp_path / "pipelines" / "two.yaml").write_text(TWO_STEPS)
    upstream = FakeServer("openai").start()
    env = {**{k: v for k, v in os.environ.items() if k != "FLOWC_STORE_URL"},
           "PYTHONPATH": str(ROOT), "OPENAI_BASE_URL": upstream.url + "/v1",
           "OPENAI_API_KEY": "sk-test-openai", "FLOWC_ADMIN_KEY": ADMIN}
    try:
        yield Project(tmp_path, postgres.fresh_database(), env, upstream)
    finally:
        upstream.stop()


def test_keys_made_by_the_cli_on_the_store_are_honoured_by_a_running_instance(
        project: Project) -> None:
    p = project
    made = p.flowc("keys", "create", "--store", p.store, "--name", "billing-bot", "--team",
                   "finance", "--budget", "1", "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    assert key["key"].startswith("sk-flowc-") and key["name"] == "billing-bot"
    port = free_port()
    server = start_server(p.folder, p.env, port, "--store", p.store)
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        ask = {"json": {"model": "flat", "max_tokens": 20,
                        "messages": [{"role": "user", "content": "hi"}]},
               "headers": {"authorization": f"Bearer {key['key']}"}, "timeout": 10}
        r = httpx.post(url, **ask)
        assert r.status_code == 200, r.text
        # its spend, settled by the instance, as `flowc keys list` shows it (from the env)
        in_env = {**p.env, "FLOWC_STORE_URL": p.store}

        def spent() -> str | None:
            listed = p.flowc("keys", "list", "--json", env=in_env)
            assert listed.returncode == 0, listed.stderr
            (only,) = json.loads(listed.stdout)
            assert only["id"] == key["id"] and only["team"] == "finance"
            return only["spend"]["key"]["spent_usd"]

        wait_until(lambda: spent() == "0.0001", 15)  # 10 tokens at $10 per 1M
        changed = p.flowc("keys", "update", key["id"], "--rpm", "7", "--json", env=in_env)
        assert changed.returncode == 0 and json.loads(changed.stdout)["rpm"] == 7, \
            changed.stderr
        wait_until(lambda: httpx.post(url, **ask).headers.get(
            "x-ratelimit-limit-requests") == "7", 10)
        revoked = p.flowc("keys", "revoke", key["id"], "--store", p.store, "--json")
        assert revoked.returncode == 0, revoked.stderr
        wait_until(lambda: httpx.post(url, **ask).status_code == 401, 10)
        shown = p.flowc("keys", "show", key["id"], "--store", p.store)
        assert shown.returncode == 0 and "revoked" in shown.stdout, shown.stderr
    finally:
        stop_server(server)
    assert not p.local_ledger.exists()  # nothing went to the project's own file
    unreachable = p.flowc("keys", "list", "--store", "postgresql://nobody@127.0.0.1:1/x")
    assert unreachable.returncode == 1 and "unreachable" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


def test_run_approve_and_the_step_cache_use_the_store(project: Project) -> None:
    p = project
    p.upstream.then(*[answers] * 4)
    started = p.flowc("run", "--store", p.store, "pipelines/" + PIPELINE.name,
                      "-i", "topic=dark mode")
    assert started.returncode == 3, started.stderr  # waiting for its approval
    run_id = started.stderr.split("flowc runs approve ")[1].split()[0]
    assert p.rows("SELECT status, instance FROM runs WHERE id = %s", (run_id,)) == [
        ("waiting", CLI)]
    assert p.rows("SELECT count(*), min(instance) FROM requests WHERE run_id = %s",
                  (run_id,)) == [(1, CLI)]
    # approved from flowc.yaml's `store:`
    (p.folder / "flowc.yaml").write_text(CONFIG + f"store: {p.store}\n")
    ok = p.flowc("runs", "approve", run_id, "review", "--json")
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["status"] == "succeeded"
    assert p.rows("SELECT status FROM runs WHERE id = %s", (run_id,)) == [("continued",)]
    assert p.rows("SELECT status FROM runs WHERE id = %s", (out["run_id"],)) == [
        ("succeeded",)]
    assert len(p.upstream.requests) == 2  # the draft, then the publishing step
    # The same topic again: the draft comes from the store's step cache, at $0.
    again = p.flowc("run", "pipelines/" + PIPELINE.name, "-i", "topic=dark mode", "--json")
    assert again.returncode == 3, again.stderr
    second = json.loads(again.stdout)["run_id"]
    assert p.rows("SELECT cached, cost_usd = 0, saved_usd > 0 FROM requests "
                  "WHERE run_id = %s", (second,)) == [(True, True, True)]
    assert len(p.upstream.requests) == 2
    listed = p.flowc("runs")
    assert listed.returncode == 0 and second in listed.stdout, listed.stderr
    assert not p.local_ledger.exists()


def test_a_run_resumed_with_the_store_reads_its_record_there(project: Project) -> None:
    p = project
    in_env = {**p.env, "FLOWC_STORE_URL": p.store}
    p.upstream.then(openai_text("A"),
                    json_body({"error": {"message": "overloaded", "type": "server_error",
                                         "param": None, "code": None}}, status=500))
    failed = p.flowc("run", "pipelines/two.yaml", "--json", env=in_env)
    assert failed.returncode == 1, failed.stderr
    first = json.loads(failed.stdout)["run_id"]
    assert p.rows("SELECT status FROM runs WHERE id = %s", (first,)) == [("failed",)]
    p.upstream.then(openai_text("B"))
    resumed = p.flowc("run", "pipelines/two.yaml", "--resume", first, "--json", "--store",
                      p.store)
    assert resumed.returncode == 0, resumed.stderr
    out = json.loads(resumed.stdout)
    assert out["output"] == "B" and len(p.upstream.requests) == 3  # only b ran again
    (record,) = p.rows("SELECT record FROM runs WHERE id = %s", (out["run_id"],))
    assert record[0]["resumed_from"] == first
    assert p.rows("SELECT count(*) FROM requests WHERE run_id IN (%s, %s)",
                  (first, out["run_id"])) == [(3,)]
    assert not p.local_ledger.exists()
    # a store that cannot be reached is the command's error, never the local file
    down = p.flowc("run", "pipelines/two.yaml", "--store", "postgresql://nobody@127.0.0.1:1/x")
    assert down.returncode == 1 and "cannot use the shared store" in down.stderr
    assert "Traceback" not in down.stderr and not p.local_ledger.exists()


def test_store_option_on_every_command_that_reads_or_writes_shared_state() -> None:
    from runtime.cli import cli

    commands = [("run",), ("costs",), ("runs",), ("runs", "approve"), ("runs", "reject"),
                ("keys", "create"), ("keys", "list"), ("keys", "show"), ("keys", "update"),
                ("keys", "revoke"), ("mcp", "list"), ("mcp", "serve"), ("serve",),
                ("check",)]
    for path in commands:
        cmd: Any = cli
        for name in path:
            cmd = cmd.commands[name]
        assert "--store" in {o for p in cmd.params for o in p.opts}, path



def test_mcp_serve_with_the_store_charges_the_key_there(postgres, tmp_path: Path) -> None:
    import asyncio

    from mcp import Client, StdioServerParameters

    from tests.test_mcp_serve import answers as asks
    from tests.test_mcp_serve import make_project

    store = postgres.fresh_database()
    project = make_project(tmp_path)
    openai = FakeServer("openai").start()
    openai.then(asks, asks)
    env = {**{k: v for k, v in os.environ.items()
              if k not in ("FLOWC_ADMIN_KEY", "FLOWC_API_KEY")},
           "PYTHONPATH": str(ROOT), "OPENAI_BASE_URL": openai.url + "/v1",
           "OPENAI_API_KEY": "sk-test-openai", "FLOWC_STORE_URL": store}
    made = subprocess.run([sys.executable, "-m", "runtime.cli", "keys", "create", "--name",
                           "agent", "--json"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    params = StdioServerParameters(command=sys.executable,
                                   args=["-m", "runtime.cli", "mcp", "serve"],
                                   env={**env, "FLOWC_API_KEY": key["key"]}, cwd=str(project))

    async def go() -> Any:
        async with Client(params, read_timeout_seconds=60) as c:
            return await c.call_tool("ask", {"question": "Where is my refund?"})

    try:
        ran = asyncio.run(go())
    finally:
        openai.stop()
    run_id = ran.meta["flowc/run_id"]
    with psycopg.connect(store) as conn:
        assert conn.execute("SELECT status, key_id, instance FROM runs WHERE id = %s",
                            [run_id]).fetchall() == [("succeeded", key["id"], CLI)]
        assert conn.execute("SELECT count(*), min(key_name), min(instance) FROM requests "
                            "WHERE run_id = %s", [run_id]).fetchall() == [(2, "agent", CLI)]
    assert not (project / ".flowc" / "ledger.duckdb").exists()

"""flowc as an MCP server: the official MCP SDK's client against `flowc serve`'s /mcp (auth on,
calls charged to the caller's key) and `flowc mcp serve` over stdio, the MCP inspector's CLI
(a client that is not ours), the real `mcp-server-time` re-exposed, loopback model
providers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from flowc.config import ProjectConfig
from runtime.access.gate import Gate
from runtime.access.store import LedgerAccessStore
from runtime.ledger.store import Ledger
from tests.conftest import ROOT, start_server, stop_server
from tests.fakes import FakeServer, free_port, openai_text, slow, wait_until
from tests.tools import require

ADMIN = "sk-flowc-admin-" + "7c3e91ab" * 5
INSPECTOR = ROOT / "tests" / "mcp" / "node_modules" / "@modelcontextprotocol" / "inspector-cli"

CONFIG = """\
models:
  fast: openai/gpt-4o-mini
mcpServers:
  time:
    command: mcp-server-time
    args: ["--local-timezone", "UTC"]
ledger: {flush_interval: 0.2}
expose:
  teams:
    support: {tools: ["ask", "time__*"]}
"""

ASK = """\
name: ask
description: Answer a question and label it
inputs:
  question: {type: string, description: The question}
  depth: {type: integer, default: 1}
steps:
  - id: answer
    type: llm
    model: fast
    prompt: "Answer: ${input.question}"
    output: answer
  - id: classify
    type: llm
    model: fast
    prompt: "Label: ${input.question}"
    response_format:
      schema:
        type: object
        properties:
          label: {type: string, enum: [billing, other]}
          score: {type: number}
        required: [label, score]
output:
  answer: ${answer}
  label: ${classify.label}
"""

SLOW = """\
name: slow
description: One long model call
inputs:
  topic: {type: string}
steps:
  - id: think
    type: llm
    model: fast
    prompt: "Think long about ${input.topic}"
output: ${think}
"""

CLOCK = """\
name: clock
description: The time in a timezone
inputs:
  tz: {type: string}
steps:
  - id: now
    type: mcp_tool
    server: time
    tool: get_current_time
    params: {timezone: "${input.tz}"}
output:
  at: ${now.datetime}
"""


@pytest.fixture(autouse=True, scope="module")
def _installed() -> None:
    require("mcp-server-time")


def answers(rec: Any) -> Any:
    """The provider's answer: JSON for the structured step, text otherwise (the two steps
    of `ask` run at once, in either order)."""
    if rec.body.get("response_format"):
        return openai_text(json.dumps({"label": "billing", "score": 0.9}))(rec)
    return openai_text("Refunds take 5 days.")(rec)


def make_project(root: Path, config: str = CONFIG, **pipelines: str) -> Path:
    (root / "pipelines").mkdir(parents=True)
    (root / "flowc.yaml").write_text(textwrap.dedent(config))
    for name, text in (pipelines or {"ask": ASK, "slow": SLOW, "clock": CLOCK}).items():
        (root / "pipelines" / f"{name}.yaml").write_text(text)
    return root


class Served:
    def __init__(self, url: str, openai: FakeServer, secrets: dict[str, str],
                 ids: dict[str, str]) -> None:
        self.url, self.openai, self.secrets, self.ids = url, openai, secrets, ids

    def client(self, key: str, **kw: Any) -> Client:
        http = httpx2.AsyncClient(headers={"authorization": f"Bearer {self.secrets[key]}"},
                                  timeout=30)
        return Client(streamable_http_client(self.url + "/mcp", http_client=http),
                      read_timeout_seconds=30, **kw)

    def sql(self, query: str, params: list[Any] | None = None) -> list[list[Any]]:
        r = httpx.post(f"{self.url}/v1/costs/sql", json={"sql": query, "params": params or []},
                       headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["rows"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    project = make_project(tmp_path_factory.mktemp("mcpserve"))
    openai, anthropic = FakeServer("openai").start(), FakeServer("anthropic").start()
    # keys made in the ledger file before the server starts (as `flowc keys create` does)
    ledger = Ledger(project / ".flowc" / "ledger.duckdb")
    cfg = ProjectConfig.model_validate({})
    gate = Gate(cfg, LedgerAccessStore(ledger), ADMIN)
    gate.load()
    secrets, ids = {}, {}
    for spec in ({"name": "agent", "team": "support"}, {"name": "ops"}):
        key, secret = gate.create(spec)
        secrets[key.name], ids[key.name] = secret, key.id
    ledger.close()
    env = {**{k: v for k, v in os.environ.items() if k != "FLOWC_API_KEY"},
           "FLOWC_ADMIN_KEY": ADMIN, "PYTHONPATH": str(ROOT),
           "OPENAI_BASE_URL": openai.url + "/v1", "OPENAI_API_KEY": "sk-test-openai",
           "ANTHROPIC_BASE_URL": anthropic.url, "ANTHROPIC_API_KEY": "sk-ant-test"}
    port = free_port()
    proc = start_server(project, env, port)
    yield Served(f"http://127.0.0.1:{port}", openai, secrets, ids)
    stop_server(proc)
    openai.stop()
    anthropic.stop()


def test_lists_pipelines_and_upstream_tools_with_their_schemas(served: Served) -> None:
    async def go(key: str) -> dict[str, Any]:
        async with served.client(key) as c:
            return {t.name: t for t in (await c.list_tools()).tools}

    tools = asyncio.run(go("ops"))
    assert sorted(tools) == ["ask", "clock", "slow", "time__convert_time",
                             "time__get_current_time"]
    ask = tools["ask"]
    assert ask.description == "Answer a question and label it"
    assert ask.input_schema == {
        "type": "object", "additionalProperties": False, "required": ["question"],
        "properties": {"question": {"type": "string", "description": "The question"},
                       "depth": {"type": "integer", "default": 1}}}
    assert ask.output_schema == {
        "type": "object", "required": ["answer", "label"],
        "properties": {"answer": {"type": "string"},
                       "label": {"type": "string", "enum": ["billing", "other"]}}}
    # one value as output: wrapped as {"result": ...}, the MCP SDKs' convention
    assert tools["slow"].output_schema == {"type": "object", "required": ["result"],
                                           "properties": {"result": {"type": "string"}}}
    time_tool = tools["time__get_current_time"]
    assert "timezone" in time_tool.input_schema["properties"]
    assert "datetime" in time_tool.output_schema["properties"]
    # the support team's filter under expose.teams
    assert sorted(asyncio.run(go("agent"))) == ["ask", "time__convert_time",
                                                "time__get_current_time"]


def test_a_pipeline_call_is_a_run_charged_to_the_key(served: Served) -> None:
    served.openai.then(answers, answers)
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total, message))

    async def go() -> Any:
        async with served.client("agent") as c:
            return await c.call_tool("ask", {"question": "Where is my refund?"},
                                     progress_callback=on_progress)

    res = asyncio.run(go())
    assert not res.is_error
    assert res.structured_content == {"answer": "Refunds take 5 days.", "label": "billing"}
    run_id = res.meta["flowc/run_id"]
    assert res.meta["flowc/status"] == "succeeded"
    assert len(progress) == 2 and progress[-1][:2] == (2, 2)
    record = httpx.get(f"{served.url}/v1/runs/{run_id}",
                       headers={"authorization": f"Bearer {ADMIN}"}, timeout=10).json()
    assert record["workflow"] == "ask" and record["status"] == "succeeded"
    rows: list[list[Any]] = []

    def recorded() -> bool:
        nonlocal rows
        rows = served.sql("SELECT key_id, team, step_id, status FROM requests "
                          "WHERE run_id = ? ORDER BY step_id", [run_id])
        return len(rows) == 2

    wait_until(recorded, 20)
    assert rows == [[served.ids["agent"], "support", "answer", "ok"],
                    [served.ids["agent"], "support", "classify", "ok"]]
    assert served.sql("SELECT key_id, team FROM runs WHERE id = ?", [run_id]) == [
        [served.ids["agent"], "support"]]


def test_a_reexposed_tool_answers_from_the_real_server(served: Served) -> None:
    async def go() -> Any:
        async with served.client("agent") as c:
            return await c.call_tool("time__get_current_time", {"timezone": "Europe/Paris"})

    res = asyncio.run(go())
    assert not res.is_error
    assert res.structured_content["timezone"] == "Europe/Paris"


def test_a_bad_argument_is_an_mcp_error_naming_the_field(served: Served) -> None:
    async def go(args: dict[str, Any]) -> MCPError:
        async with served.client("ops") as c:
            with pytest.raises(MCPError) as err:
                await c.call_tool("ask", args)
            return err.value

    err = asyncio.run(go({"question": 42}))
    assert err.error.code == -32602
    assert "input 'question' must be string" in err.error.message
    err = asyncio.run(go({"depth": 2}))
    assert "missing required input 'question'" in err.error.message


def test_a_failed_step_is_a_tool_error_naming_it(served: Served) -> None:
    async def go() -> Any:
        async with served.client("ops") as c:
            return await c.call_tool("clock", {"tz": "Nowhere/Atlantis"})

    res = asyncio.run(go())
    assert res.is_error
    assert res.content[0].text.startswith("step 'now' failed:")
    assert res.meta["flowc/failed_step"] == "now"


def test_a_tool_outside_the_keys_filter_cannot_be_called(served: Served) -> None:
    async def go() -> MCPError:
        async with served.client("agent") as c:
            with pytest.raises(MCPError) as err:
                await c.call_tool("clock", {"tz": "UTC"})
            return err.value

    assert "Unknown tool: clock" in asyncio.run(go()).error.message


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_cancelling_a_call_stops_the_run(served: Served, mode: str) -> None:
    served.openai.then(slow(30, openai_text("too late")))
    topic = f"cancel-{mode}"

    async def go() -> None:
        async with served.client("ops", mode=mode) as c:
            call = asyncio.create_task(c.call_tool("slow", {"topic": topic}))
            for _ in range(200):  # until the model call is under way
                if any(topic in json.dumps(r.body) for r in served.openai.requests):
                    break
                await asyncio.sleep(0.05)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

    asyncio.run(go())
    rows: list[list[Any]] = []

    def recorded() -> bool:
        nonlocal rows
        rows = served.sql("SELECT status, error_class FROM requests WHERE workflow_name = "
                          "'slow' AND key_id = ? ORDER BY ts DESC LIMIT 1", [served.ids["ops"]])
        return bool(rows)

    wait_until(recorded, 10)  # long before the provider's 30 s answer
    assert rows == [["cancelled", "CancelledError"]]
    run = served.sql("SELECT status, key_id, record->>'$.metrics.steps[0].status' FROM runs "
                     "WHERE workflow_name = 'slow' ORDER BY started_at DESC LIMIT 1")
    assert run == [["cancelled", served.ids["ops"], "cancelled"]]


def test_the_mcp_inspector_cli_lists_and_calls(served: Served) -> None:
    require("node", files=(INSPECTOR / "build" / "index.js",))

    def inspector(*args: str) -> Any:
        # it reads its own package.json relative to the working directory
        out = subprocess.run(
            ["node", "index.js", served.url + "/mcp", "--transport", "http",
             "--header", f"Authorization: Bearer {served.secrets['ops']}", *args],
            cwd=INSPECTOR / "build", capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    names = [t["name"] for t in inspector("--method", "tools/list")["tools"]]
    assert "ask" in names and "time__get_current_time" in names
    res = inspector("--method", "tools/call", "--tool-name", "time__get_current_time",
                    "--tool-arg", "timezone=Asia/Tokyo")
    assert res["structuredContent"]["timezone"] == "Asia/Tokyo"
    served.openai.then(answers, answers)
    res = inspector("--method", "tools/call", "--tool-name", "ask",
                    "--tool-arg", "question=Where is my refund?")
    assert res["structuredContent"] == {"answer": "Refunds take 5 days.", "label": "billing"}
    assert res["_meta"]["flowc/status"] == "succeeded"


def test_stdio_serves_the_same_tools_and_runs(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    openai = FakeServer("openai").start()
    openai.then(answers, answers)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_BASE_URL": openai.url + "/v1",
           "OPENAI_API_KEY": "sk-test-openai"}
    env.pop("FLOWC_ADMIN_KEY", None)
    env.pop("FLOWC_API_KEY", None)
    params = StdioServerParameters(command=sys.executable,
                                   args=["-m", "runtime.cli", "mcp", "serve"],
                                   env=env, cwd=str(project))

    async def go() -> tuple[list[str], Any, Any]:
        async with Client(params, read_timeout_seconds=60) as c:
            names = sorted(t.name for t in (await c.list_tools()).tools)
            ran = await c.call_tool("ask", {"question": "Where is my refund?"})
            now = await c.call_tool("time__get_current_time", {"timezone": "UTC"})
            return names, ran, now

    try:
        names, ran, now = asyncio.run(go())
    finally:
        openai.stop()
    assert names == ["ask", "clock", "slow", "time__convert_time", "time__get_current_time"]
    assert ran.structured_content == {"answer": "Refunds take 5 days.", "label": "billing"}
    assert now.structured_content["timezone"] == "UTC"
    ledger = Ledger(project / ".flowc" / "ledger.duckdb")
    try:
        runs = ledger.execute("SELECT workflow_name, status FROM runs WHERE id = ?",
                              [ran.meta["flowc/run_id"]])
        calls = ledger.execute("SELECT count(*) FROM requests WHERE run_id = ?",
                               [ran.meta["flowc/run_id"]])
    finally:
        ledger.close()
    assert runs == [("ask", "succeeded")] and calls == [(2,)]


def test_a_name_collision_stops_the_server_from_starting(tmp_path: Path) -> None:
    clash = SLOW.replace("name: slow", "name: time__get_current_time")
    project = make_project(tmp_path, time__get_current_time=clash)
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "mcp", "serve"], cwd=project,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert ("pipeline 'time__get_current_time' would be offered as 'time__get_current_time', "
            "a name in the 'time__' space of the re-exposed MCP server 'time'") in out.stderr


def test_mcp_list_tokens_prices_each_servers_tool_list(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "mcp", "list", "--tokens"],
                         cwd=project, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    head, *tools = lines
    assert head.startswith("time: 2 tools, ~") and head.endswith(" tokens")
    costs = {line.split()[1]: int(line.split()[0].replace(",", "")) for line in tools}
    assert set(costs) == {"time__get_current_time", "time__convert_time"}
    assert int(head.split("~")[1].split()[0].replace(",", "")) == sum(costs.values())


def test_get_and_delete_pass_the_front_door_and_a_session_stays_with_its_key(
        served: Served) -> None:
    url = served.url + "/mcp"
    accept = {"accept": "application/json, text/event-stream"}

    def auth(key: str) -> dict[str, str]:
        return {**accept, "authorization": f"Bearer {served.secrets[key]}"}

    hello = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"}}}
    assert httpx.post(url, json=hello, headers=accept, timeout=10).status_code == 401
    r = httpx.post(url, json=hello, headers=auth("ops"), timeout=10)
    assert r.status_code == 200, r.text
    sid = {"mcp-session-id": r.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"}
    done = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert httpx.post(url, json=done, headers={**auth("ops"), **sid},
                      timeout=10).status_code == 202
    with httpx.stream("GET", url, headers={**auth("ops"), **sid,
                                           "accept": "text/event-stream"}, timeout=10) as s:
        assert s.status_code == 200
        assert s.headers["content-type"].startswith("text/event-stream")
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}
    other = httpx.post(url, json=listing, headers={**auth("agent"), **sid}, timeout=10)
    assert other.status_code == 404  # another key cannot use this session
    assert httpx.post(url, json=listing, headers={**auth("ops"), **sid},
                      timeout=10).status_code == 200
    assert httpx.delete(url, headers={**auth("ops"), **sid}, timeout=10).status_code == 200
    gone = httpx.post(url, json=listing, headers={**auth("ops"), **sid}, timeout=10)
    assert gone.status_code == 404


def _children(pid: int, name: str) -> int:
    """How many of ``pid``'s child processes are named ``name``."""
    n = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:]
        if comm == name and int(rest.split()[1]) == pid:
            n += 1
    return n


def test_a_stateful_server_gets_a_session_per_client_session(tmp_path: Path) -> None:
    config = CONFIG.replace("expose:\n", "expose:\n  servers:\n    time: {stateful: true}\n")
    project = make_project(tmp_path, config, ask=ASK)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FLOWC_ADMIN_KEY", None)
    port = free_port()
    proc = start_server(project, env, port)
    url = f"http://127.0.0.1:{port}/mcp"
    counts: list[int] = []

    async def client(opened: asyncio.Event, release: asyncio.Event) -> None:
        async with Client(url, mode="legacy", read_timeout_seconds=30) as c:
            res = await c.call_tool("time__get_current_time", {"timezone": "UTC"})
            assert not res.is_error
            opened.set()
            await release.wait()

    async def go() -> None:
        opened = [asyncio.Event(), asyncio.Event()]
        release = asyncio.Event()
        tasks = [asyncio.create_task(client(o, release)) for o in opened]
        await asyncio.gather(*(o.wait() for o in opened))
        counts.append(_children(proc.pid, "mcp-server-time"))
        release.set()
        await asyncio.gather(*tasks)  # each client ends its session (DELETE)
        await asyncio.sleep(3)
        counts.append(_children(proc.pid, "mcp-server-time"))

    try:
        asyncio.run(go())
    finally:
        stop_server(proc)
    # the shared session (it lists the tools) and one per client session; those two close
    # with their client sessions
    assert counts == [3, 1]


def test_two_names_cut_to_the_same_64_characters_stop_the_start(tmp_path: Path) -> None:
    long = "a" * 64
    project = make_project(tmp_path, **{
        "one": SLOW.replace("name: slow", f"name: {long}-one"),
        "two": SLOW.replace("name: slow", f"name: {long}-two")})
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "mcp", "serve"], cwd=project,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert (f"two MCP tools would be named '{long}': pipeline '{long}-one' and pipeline "
            f"'{long}-two'") in out.stderr


def test_the_token_cap_keeps_the_named_tools_first(tmp_path: Path) -> None:
    # time__get_current_time ~178 tokens, slow ~68, ask ~104, time__convert_time ~338:
    # under 300, with the first two kept first, neither of the others fits
    config = CONFIG.replace("expose:\n", "expose:\n  max_tokens: 300\n"
                                         "  keep: [time__get_current_time, slow]\n")
    project = make_project(tmp_path, config, ask=ASK, slow=SLOW)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FLOWC_API_KEY", None)
    params = StdioServerParameters(command=sys.executable,
                                   args=["-m", "runtime.cli", "mcp", "serve"],
                                   env=env, cwd=str(project))

    async def go() -> list[str]:
        async with Client(params, read_timeout_seconds=60) as c:
            return [t.name for t in (await c.list_tools()).tools]

    names = asyncio.run(go())
    assert names == ["time__get_current_time", "slow"]


def test_typed_inputs_reach_the_tools_input_schema() -> None:
    from flowc.compiler import compile_source
    from runtime.mcp.serve_schema import input_schema

    compiled = compile_source(textwrap.dedent("""\
        name: tagged
        inputs:
          tags: {type: array, items: {type: string}, description: Labels}
          user:
            type: object
            properties: {name: {type: string}, tier: {type: string, enum: [free, pro]}}
            required: [name]
          lang: {type: string, enum: [en, de], default: en}
        steps:
          - {id: a, type: transform, expr: "join(${input.tags}, ', ')"}
        """), "tagged.yaml").compiled
    assert compiled is not None
    assert input_schema(compiled) == {
        "type": "object", "additionalProperties": False, "required": ["tags", "user"],
        "properties": {
            "tags": {"type": "array", "items": {"type": "string"}, "description": "Labels"},
            "user": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string"},
                "tier": {"type": "string", "enum": ["free", "pro"]}}},
            "lang": {"type": "string", "enum": ["en", "de"], "default": "en"}}}

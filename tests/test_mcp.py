"""MCP against real third-party servers: PyPI `mcp-server-time` (stdio) and npm
`@modelcontextprotocol/server-everything` (stdio and streamable HTTP), started by the tests."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from flowc import Project, compile_file, compile_source
from flowc.config import MCPServerConfig, ProjectConfig
from runtime.executor import Executor, StepFailed
from runtime.gateway.calls import ModelCaller
from runtime.gateway.routing import Router
from runtime.ledger.store import Ledger
from runtime.mcp.manager import MCPManager
from runtime.providers import Providers
from tests.fakes import FakeServer, free_port, openai_text, wait_until
from tests.tools import EVERYTHING, require

ROOT = Path(__file__).resolve().parent.parent
TIME = MCPServerConfig(command="mcp-server-time", args=["--local-timezone", "UTC"])


@pytest.fixture(autouse=True, scope="module")
def _servers_installed() -> None:
    require("node", "mcp-server-time", files=(EVERYTHING,))


def everything(*extra: str, **kw) -> MCPServerConfig:
    return MCPServerConfig(command="node", args=[str(EVERYTHING), "stdio", *extra], **kw)


@pytest.fixture(scope="module")
def everything_http():
    port = free_port()
    proc = subprocess.Popen(["node", str(ROOT / "tests" / "mcp" / "everything-http.mjs")],
                            env={**os.environ, "PORT": str(port)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=ROOT / "tests" / "mcp")

    def up() -> bool:
        try:
            httpx.get(f"http://127.0.0.1:{port}/mcp", timeout=1)
            return True
        except httpx.HTTPError:
            return False

    wait_until(up, 20)
    yield f"http://127.0.0.1:{port}/mcp"
    proc.terminate()
    proc.wait(10)


def run_async(coro):
    return asyncio.run(coro)


def test_discovery_is_concurrent_and_reports_a_dead_server(tmp_path, everything_http):
    async def go():
        m = MCPManager({"time": TIME, "ev": everything(),
                        "evhttp": MCPServerConfig(url=everything_http),
                        "dead": MCPServerConfig(command="sh", args=["-c", "sleep 30"]),
                        "missing": MCPServerConfig(command="no-such-binary-here")}, tmp_path)
        t0 = time.perf_counter()
        found = await m.discover(timeout=4)
        elapsed = time.perf_counter() - t0
        await m.close()
        return found, elapsed

    found, elapsed = run_async(go())
    assert elapsed < 8  # the 30 s server was given 4 s, in parallel with the others
    assert [t["name"] for t in found["time"]["tools"]] == ["get_current_time", "convert_time"]
    assert {"echo", "get-sum"} <= {t["name"] for t in found["ev"]["tools"]}
    assert {"echo", "get-sum"} <= {t["name"] for t in found["evhttp"]["tools"]}
    assert not found["dead"]["ok"] and not found["missing"]["ok"]
    assert found["missing"]["error"]
    schema = next(t for t in found["time"]["tools"] if t["name"] == "get_current_time")
    assert schema["inputSchema"]["required"] == ["timezone"]


def test_calls_over_stdio_and_http_share_one_session(tmp_path, everything_http):
    async def go():
        m = MCPManager({"ev": everything(), "evhttp": MCPServerConfig(url=everything_http)},
                       tmp_path)
        sums = await asyncio.gather(*(m.call_tool("ev", "get-sum", {"a": i, "b": 1})
                                      for i in range(20)))
        echo = await m.call_tool("evhttp", "echo", {"message": "over http"})
        starts = m.sessions["ev"].starts
        await m.close()
        return sums, echo, starts

    sums, echo, starts = run_async(go())
    assert [s.text for s in sums] == [f"The sum of {i} and 1 is {i + 1}." for i in range(20)]
    assert starts == 1  # 20 calls, one server process
    assert echo.text == "Echo: over http"


def test_structured_results_and_tool_errors(tmp_path):
    async def go():
        m = MCPManager({"time": TIME}, tmp_path)
        ok = await m.call_tool("time", "get_current_time", {"timezone": "Europe/Paris"})
        bad = await m.call_tool("time", "get_current_time", {"timezone": "Mars/Olympus"})
        await m.close()
        return ok, bad

    ok, bad = run_async(go())
    assert ok.structured["timezone"] == "Europe/Paris" and not ok.is_error
    assert set(ok.structured) == {"timezone", "datetime", "day_of_week", "is_dst"}
    assert bad.is_error and "Invalid timezone" in bad.text


def test_timeouts_and_a_server_that_crashes_mid_call(tmp_path):
    marker = f"flowc-test-{os.getpid()}-{time.time_ns()}"

    async def go():
        m = MCPManager({"ev": everything(marker)}, tmp_path)
        with pytest.raises(StepFailed, match=r"timed out after 0\.5 s"):
            await m.call_tool("ev", "trigger-long-running-operation",
                              {"duration": 5, "steps": 5}, timeout=0.5)
        still = await m.call_tool("ev", "echo", {"message": "after timeout"})

        async def kill_soon() -> None:
            await asyncio.sleep(0.5)
            subprocess.run(["pkill", "-f", marker], check=False)

        killer = asyncio.create_task(kill_soon())
        with pytest.raises(StepFailed, match="closed the connection"):
            await m.call_tool("ev", "trigger-long-running-operation",
                              {"duration": 10, "steps": 5}, timeout=30)
        await killer
        again = await m.call_tool("ev", "echo", {"message": "restarted"})
        starts = m.sessions["ev"].starts
        await m.close()
        return still, again, starts

    still, again, starts = run_async(go())
    assert still.text == "Echo: after timeout"  # the session survives a timed-out call
    assert again.text == "Echo: restarted" and starts == 2
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    assert left.stdout.strip() == ""  # no orphan processes


def test_env_reaches_stdio_servers(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWC_TEST_TOKEN", "s3cret-value")

    async def go():
        m = MCPManager({"ev": everything(env={"TOKEN_FOR_SERVER": "${env.FLOWC_TEST_TOKEN}"})},
                       tmp_path)
        res = await m.call_tool("ev", "get-env", {})
        await m.close()
        return res

    assert json.loads(run_async(go()).text)["TOKEN_FOR_SERVER"] == "s3cret-value"


def test_unknown_servers_cannot_be_reached(tmp_path):
    async def go():
        m = MCPManager({"time": TIME}, tmp_path)
        try:
            await m.call_tool("rm -rf /", "x", {})
        finally:
            await m.close()

    with pytest.raises(StepFailed, match=r"is not in flowc\.yaml"):
        run_async(go())


PLANNER_CONFIG = """\
models:
  fast: openai/gpt-4o-mini
retry: {attempts: 0}
mcpServers:
  time:
    command: mcp-server-time
    args: ["--local-timezone", "UTC"]
"""


def test_llm_step_calls_a_tool_the_model_asks_for(tmp_path):
    """The meeting planner from pipelines/: real time server, a model (loopback OpenAI)
    that asks for convert_time and then answers with its result."""
    fake = FakeServer("openai").start()
    tool_call = {"id": "call_1", "type": "function", "function": {
        "name": "time__convert_time",
        "arguments": json.dumps({"source_timezone": "Europe/Paris", "time": "10:00",
                                 "target_timezone": "America/New_York"})}}

    def asks_for_tool(rec):
        return {"id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                    "role": "assistant", "content": None, "tool_calls": [tool_call]}}],
                "usage": {"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70}}

    fake.then(asks_for_tool, openai_text("Meet at 10:00 Paris / 04:00 New York."))
    (tmp_path / "flowc.yaml").write_text(PLANNER_CONFIG)
    config = ProjectConfig.model_validate(__import__("yaml").safe_load(PLANNER_CONFIG))
    result = compile_file(ROOT / "pipelines" / "meeting-planner.yaml",
                          Project.load(tmp_path / "flowc.yaml"))
    assert result.compiled is not None, result.diagnostics

    async def go():
        providers = Providers(config, env={"OPENAI_BASE_URL": fake.url + "/v1"})
        ledger = Ledger(tmp_path / "l.duckdb", 0.1)
        mcp = MCPManager(config.mcp_servers, tmp_path)
        try:
            caller = ModelCaller(config, providers, Router(config, providers), ledger)
            out = await Executor(caller, mcp).run(result.compiled, {})
            ledger.flush()
            rows = ledger.select("SELECT step_id, prompt_tokens FROM requests")[1]
            return out, rows, mcp.sessions["time"].starts
        finally:
            await mcp.close()
            await providers.close()
            ledger.close()

    out, rows, starts = run_async(go())
    fake.stop()
    assert out.status == "succeeded", out.error
    assert out.output["plan"] == "Meet at 10:00 Paris / 04:00 New York."
    assert isinstance(out.output["home_is_dst"], bool)
    assert out.steps["plan"].model_calls == 2 and out.steps["plan"].tool_calls == 1
    kinds = [(c["kind"], c.get("tool") or c.get("provider"), c.get("ok", True))
             for c in out.steps["plan"].calls]
    assert kinds == [("model", "openai", True), ("tool", "convert_time", True),
                     ("model", "openai", True)]  # every call, in order, in the run record
    assert starts == 1  # three tool calls, one server
    first, second = (r.body for r in fake.requests)
    assert [t["function"]["name"] for t in first["tools"]] == ["time__convert_time"]
    tool_msg = second["messages"][-1]
    assert tool_msg["role"] == "tool" and tool_msg["tool_call_id"] == "call_1"
    assert json.loads(tool_msg["content"])["target"]["timezone"] == "America/New_York"
    assert "Europe/Paris" in first["messages"][0]["content"]  # the prompt got home_now
    assert sorted(r[0] for r in rows) == ["plan", "plan"]  # both model calls on the books


def test_mcp_list_writes_the_cache_check_uses(tmp_path):
    (tmp_path / "flowc.yaml").write_text(PLANNER_CONFIG)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "mcp", "list"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "✓ time (2 tools" in r.stdout and "get_current_time(timezone)" in r.stdout
    cache = json.loads((tmp_path / ".flowc" / "mcp-tools.json").read_text())
    assert cache["servers"]["time"]["ok"]
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        name: p
        steps:
          - id: now
            type: mcp_tool
            server: time
            tool: get_current_time
            params: {timezone: 3}
        output: ${now.datetime}
        """))
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "check", "p.yaml"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "p.yaml:7:24: error: params.timezone: 3 is not of type 'string' " \
           "(tool 'time.get_current_time') [tool-params]" in r.stdout
    (tmp_path / ".flowc" / "mcp-tools.json").unlink()
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "check", "--live", "p.yaml"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "[tool-params]" in r.stdout  # --live rebuilt the cache
    assert (tmp_path / ".flowc" / "mcp-tools.json").exists()
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "mcp", "call", "time",
                        "get_current_time", "--arg", "timezone=Asia/Tokyo"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["timezone"] == "Asia/Tokyo"


def test_tool_step_error_fails_with_the_tools_message(tmp_path):
    config = ProjectConfig.model_validate({"mcpServers": {"time": TIME.model_dump()}})
    compiled = compile_source(textwrap.dedent("""\
        name: tz
        steps:
          - {id: now, type: mcp_tool, server: time, tool: get_current_time,
             params: {timezone: Mars/Olympus}}
        output: ${now}
        """), "tz.yaml", Project(config=config)).compiled

    async def go():
        mcp = MCPManager(config.mcp_servers, tmp_path)
        try:
            return await Executor(None, mcp).run(compiled, {})  # type: ignore[arg-type]
        finally:
            await mcp.close()

    out = run_async(go())
    assert out.status == "failed" and out.error["step"] == "now"
    assert out.error["message"].startswith("tool time.get_current_time failed: Error executing "
                                           "tool get_current_time: Invalid timezone")


def test_cancelling_a_run_cancels_its_tool_calls(tmp_path):
    marker = f"flowc-cancel-{os.getpid()}-{time.time_ns()}"
    config = ProjectConfig.model_validate({
        "models": {"m": "openai/gpt-4o-mini"},
        "mcpServers": {"ev": everything(marker).model_dump()}})
    compiled = compile_source(textwrap.dedent("""\
        name: cancel
        steps:
          - id: long
            type: mcp_tool
            server: ev
            tool: trigger-long-running-operation
            params: {duration: 20, steps: 4}
          - {id: bad, type: mcp_tool, server: ev, tool: no-such-tool}
        output: {a: "${long}", b: "${bad}"}
        """), "c.yaml", Project(config=config)).compiled
    assert compiled is not None

    async def go():
        mcp = MCPManager(config.mcp_servers, tmp_path)
        try:
            t0 = time.perf_counter()
            out = await Executor(None, mcp).run(compiled, {})  # type: ignore[arg-type]
            elapsed = time.perf_counter() - t0
            echo = await mcp.call_tool("ev", "echo", {"message": "still here"})
            return out, elapsed, echo
        finally:
            await mcp.close()

    out, elapsed, echo = run_async(go())
    assert out.status == "failed" and out.error["step"] == "bad"
    assert out.steps["long"].status == "cancelled"
    assert elapsed < 10  # the 20 s call did not hold the run
    assert echo.text == "Echo: still here"  # the session survives the cancelled call


def test_server_names_that_would_clash_in_tool_names_are_refused(tmp_path):
    (tmp_path / "flowc.yaml").write_text("mcpServers:\n  my__srv: {command: x}\n")
    project = Project.load(tmp_path / "flowc.yaml")
    assert [d.message for d in project.diagnostics] == [
        "invalid 'mcpServers': MCP server name 'my__srv' must use letters, digits, '-' and "
        "single '_' only"]


def test_a_servers_cold_start_does_not_count_against_the_step_timeout(tmp_path):
    """`timeout:` bounds the tool call; starting the stdio server (~0.5-2 s) comes before
    it, so a tight timeout on a fast tool holds from a fresh `flowc run`."""
    (tmp_path / "flowc.yaml").write_text(
        "mcpServers:\n  time:\n    command: mcp-server-time\n"
        "    args: [--local-timezone, UTC]\n")
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        name: tight
        steps:
          - id: now
            type: mcp_tool
            server: time
            tool: get_current_time
            params: {timezone: UTC}
            timeout: 0.3
        output: ${now}
        """))
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "run", "p.yaml", "--json"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "succeeded" and out["output"]["timezone"] == "UTC"

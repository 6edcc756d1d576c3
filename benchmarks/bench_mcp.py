"""MCP overhead: a tool call through flowc against the bare SDK on an already-open session
(same server, same tool), and how many times a 20-call pipeline starts its server.
With --serve, flowc as an MCP server: a pipeline tool's call over /mcp against the same
pipeline through POST /v1/workflow (one `flowc serve`, a loopback OpenAI, one keep-alive
connection each, alternating), and tools/list with 100 pipelines registered.

    python benchmarks/bench_mcp.py [--calls 300] [--serve]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from flowc.config import MCPServerConfig
from runtime.mcp.manager import MCPManager

SERVER = MCPServerConfig(command="mcp-server-time", args=["--local-timezone", "UTC"])
ARGS = {"timezone": "Europe/Paris"}


async def bare(calls: int) -> list[float]:
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    params = StdioServerParameters(command=SERVER.command or "", args=SERVER.args)
    times = []
    with open("/dev/null", "w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), \
                ClientSession(read, write, read_timeout_seconds=30) as session:
            await session.initialize()
            for _ in range(20):
                await session.call_tool("get_current_time", ARGS)
            for _ in range(calls):
                t0 = time.perf_counter()
                await session.call_tool("get_current_time", ARGS, read_timeout_seconds=30)
                times.append((time.perf_counter() - t0) * 1000)
    return times


async def flowc(calls: int) -> tuple[list[float], int]:
    with tempfile.TemporaryDirectory() as tmp:
        manager = MCPManager({"time": SERVER}, Path(tmp))
        for _ in range(20):
            await manager.call_tool("time", "get_current_time", ARGS)
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await manager.call_tool("time", "get_current_time", ARGS)
            times.append((time.perf_counter() - t0) * 1000)
        starts = manager.sessions["time"].starts
        await manager.close()
    return times, starts


PIPELINE = """\
name: bench{n}
description: One model call
inputs:
  q: {{type: string}}
steps:
  - id: a
    type: llm
    model: openai/gpt-4o-mini
    prompt: "${{input.q}}"
output:
  a: ${{a}}
"""


def _post(conn: Any, path: str, body: dict[str, Any], headers: dict[str, str]
          ) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    conn.request("POST", path, json.dumps(body).encode(), {"content-type": "application/json",
                                                 **headers})
    resp = conn.getresponse()
    data = resp.read()
    elapsed = (time.perf_counter() - t0) * 1000
    assert resp.status == 200, data[:300]
    return elapsed, data


def _mcp(method: str, params: dict[str, Any], name: str | None = None
         ) -> tuple[dict[str, Any], dict[str, str]]:
    """A 2026-07-28 request: the envelope in `_meta`, the routing headers."""
    import mcp_types

    meta = {mcp_types.PROTOCOL_VERSION_META_KEY: "2026-07-28",
            mcp_types.CLIENT_CAPABILITIES_META_KEY: {}}
    headers = {"accept": "application/json, text/event-stream",
               "mcp-protocol-version": "2026-07-28", "mcp-method": method}
    if name is not None:
        headers["mcp-name"] = name
    return ({"jsonrpc": "2.0", "id": 1, "method": method,
             "params": {**params, "_meta": meta}}, headers)


def serve(calls: int) -> None:
    import http.client
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from tests.conftest import start_server, stop_server
    from tests.fakes import FakeServer, free_port

    openai = FakeServer("openai").start()
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        (project / "pipelines").mkdir()
        (project / "pipelines" / "bench0.yaml").write_text(PIPELINE.format(n=0))
        (project / "flowc.yaml").write_text("ledger: {flush_interval: 0.5}\n")
        env = {**os.environ, "PYTHONPATH": str(root), "OPENAI_API_KEY": "sk-bench",
               "OPENAI_BASE_URL": openai.url + "/v1"}
        env.pop("FLOWC_ADMIN_KEY", None)
        port = free_port()
        proc: subprocess.Popen[bytes] = start_server(project, env, port)
        try:
            wf = http.client.HTTPConnection("127.0.0.1", port)
            mc = http.client.HTTPConnection("127.0.0.1", port)
            body, headers = _mcp("tools/call", {"name": "bench0", "arguments": {"q": "hi"}},
                                 "bench0")
            for _ in range(30):  # warm both paths
                _post(wf, "/v1/workflow/bench0", {"input": {"q": "hi"}}, {})
                _post(mc, "/mcp", body, headers)
            workflow, tool = [], []
            for _ in range(calls):
                workflow.append(_post(wf, "/v1/workflow/bench0", {"input": {"q": "hi"}}, {})[0])
                tool.append(_post(mc, "/mcp", body, headers)[0])
            p50_wf, p50_tool = statistics.median(workflow), statistics.median(tool)
            print(f"POST /v1/workflow p50:    {p50_wf:.3f} ms")
            print(f"MCP tools/call p50:       {p50_tool:.3f} ms")
            print(f"MCP's added cost:         {p50_tool - p50_wf:+.3f} ms (p50)")
            for n in range(1, 100):
                conn = http.client.HTTPConnection("127.0.0.1", port)
                conn.request("PUT", f"/v1/workflows/bench{n}", PIPELINE.format(n=n),
                             {"content-type": "application/yaml"})
                assert conn.getresponse().read() and True
                conn.close()
            body, headers = _mcp("tools/list", {})
            listed = []
            for i in range(calls + 30):
                ms, data = _post(mc, "/mcp", body, headers)
                if i == 0:
                    assert data.count(b'"name":"bench') == 100, data[:300]
                if i >= 30:
                    listed.append(ms)
            print(f"tools/list, 100 pipelines p50: {statistics.median(listed):.3f} ms "
                  f"(p99 {sorted(listed)[int(len(listed) * 0.99) - 1]:.3f} ms)")
        finally:
            stop_server(proc)
            openai.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--serve", action="store_true",
                    help="flowc as an MCP server instead (see the module docstring).")
    args = ap.parse_args()
    if args.serve:
        serve(args.calls)
        return
    sdk = asyncio.run(bare(args.calls))
    ours, starts = asyncio.run(flowc(args.calls))
    p50_sdk, p50_ours = statistics.median(sdk), statistics.median(ours)
    print(f"bare SDK call_tool p50: {p50_sdk:.3f} ms, mean {statistics.mean(sdk):.3f} ms")
    print(f"through flowc p50:      {p50_ours:.3f} ms, mean {statistics.mean(ours):.3f} ms")
    print(f"flowc's added cost:     {p50_ours - p50_sdk:+.3f} ms (p50)")
    print(f"server starts for {args.calls + 20} calls: {starts}")


if __name__ == "__main__":
    main()

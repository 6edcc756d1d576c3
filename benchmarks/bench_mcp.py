"""MCP overhead: a tool call through flowc against the bare SDK on an already-open session
(same server, same tool), and how many times a 20-call pipeline starts its server.

    python benchmarks/bench_mcp.py [--calls 300]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    sdk = asyncio.run(bare(args.calls))
    ours, starts = asyncio.run(flowc(args.calls))
    p50_sdk, p50_ours = statistics.median(sdk), statistics.median(ours)
    print(f"bare SDK call_tool p50: {p50_sdk:.3f} ms, mean {statistics.mean(sdk):.3f} ms")
    print(f"through flowc p50:      {p50_ours:.3f} ms, mean {statistics.mean(ours):.3f} ms")
    print(f"flowc's added cost:     {p50_ours - p50_sdk:+.3f} ms (p50)")
    print(f"server starts for {args.calls + 20} calls: {starts}")


if __name__ == "__main__":
    main()

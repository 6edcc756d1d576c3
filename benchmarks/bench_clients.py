"""Which upstream HTTP client the gateway's hot path uses, by measurement.

The Python floor (benchmarks/gateway/floor.py: a bare ASGI pass-through on uvicorn) with each
candidate client in front of the same Node upstream, all up at once: sequential requests
interleaved across them for the added p50 at c=1 (each against the upstream asked directly
in the same loop), then wrk at c=32 in alternating rounds for req/s and the server's CPU per
request (which a busy machine disturbs least). Candidates that are not installed are
skipped with a note; `pip install pyreqwest aiosonic httpr curl_cffi` for all of them.

    python benchmarks/bench_clients.py [--requests 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import statistics
import sys
import time

import bench_gateway as b

CLIENTS = ["aiohttp", "flowc", "pyreqwest", "aiosonic", "httpr", "curl_cffi"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    clients = [c for c in CLIENTS if c in ("flowc",) or importlib.util.find_spec(c)]
    for c in set(CLIENTS) - set(clients):
        print(f"({c} is not installed: skipped)")
    procs = []
    try:
        up_port = b.free_port()
        procs.append(b.start(["node", "upstream.mjs"], {**os.environ, "PORT": str(up_port)},
                             b.GW))
        upstream = f"http://127.0.0.1:{up_port}"
        b.wait_http(upstream)
        servers: dict[str, tuple[int, int]] = {}
        for client in clients:
            port = b.free_port()
            procs.append(b.start([sys.executable, str(b.GW / "floor.py"), str(port), upstream,
                                  client], {**os.environ, "PYTHONPATH": str(b.ROOT)}, b.GW))
            servers[client] = (port, procs[-1].pid)
        for port, _ in servers.values():
            b.wait_http(f"http://127.0.0.1:{port}/")
        payload = json.dumps({"model": "gpt-4o-mini", **b.CHAT}).encode()
        targets = [("direct", up_port)] + [(c, p) for c, (p, _) in servers.items()]
        conns = {name: http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                 for name, port in targets}
        times: dict[str, list[float]] = {name: [] for name, _ in targets}
        for i in range(args.requests + 200):
            for name, _ in (targets if i % 2 == 0 else targets[::-1]):
                t0 = time.perf_counter()
                conns[name].request("POST", "/v1/chat/completions", payload,
                                    {"content-type": "application/json"})
                resp = conns[name].getresponse()
                resp.read()
                if i >= 200:  # a warm-up first
                    times[name].append(time.perf_counter() - t0)
        direct = statistics.median(times["direct"])
        runs: dict[str, list[tuple[float, float, int]]] = {c: [] for c in servers}
        for r in range(args.rounds):
            for client in (clients if r % 2 == 0 else clients[::-1]):
                port, pid = servers[client]
                used = b.cpu_seconds(pid)
                m = b.wrk(f"http://127.0.0.1:{port}/v1/chat/completions", "gpt-4o-mini", 32, 3,
                          {})
                runs[client].append((m["rps"], (b.cpu_seconds(pid) - used) * 1e6
                                     / max(m["requests"], 1), m["errors"]))
    finally:
        for p in procs:
            b.stop(p)
    print("| client | added p50 at c=1 (ms) | req/s at c=32 | server CPU per request (us) "
          "| errors |\n|---|---:|---:|---:|---:|")
    for client in clients:
        rps = statistics.median(r[0] for r in runs[client])
        cpu = statistics.median(r[1] for r in runs[client])
        added = (statistics.median(times[client]) - direct) * 1000
        print(f"| {client} | {added:+.3f} | {rps:,.0f} | {cpu:.0f} | "
              f"{sum(r[2] for r in runs[client])} |")


if __name__ == "__main__":
    main()

"""What a gateway request costs in CPU instructions, auth off against auth on: a count that
does not move with the machine.

Wall-clock runs on this machine swing by more than what auth adds (identical servers
measured 144-251 us of CPU a request, round to round, see docs/benchmarks.md), so
`bench_gateway.py`'s side-by-side req/s needs many pairs to say anything. Valgrind's
callgrind counts the instructions a process executes in user space, and the same requests
to the same code count the same (repeat runs agree within ~0.5%) whatever else the machine
is doing. Each variant's `flowc serve` runs under callgrind, with instrumentation off
through start-up and a warm-up, on for `--requests` sequential chat completions, and the
count is divided by them. Kernel time (the syscalls, the same in every variant) is not in
it; what auth adds is all user space. The ledger's own process is not counted, nor are
`--workers`: what they do follows the clock (flushes, ticks) more than the requests, and
under callgrind, ~50x slower, each request would carry 50 times its share of it.

    python benchmarks/bench_instructions.py [--requests 1000] [--print-only]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_gateway import (  # noqa: E402  (the gateway benchmark's setup)
    ADMIN,
    CHAT,
    GW,
    ROOT,
    bench_key,
    free_port,
    start,
    stop,
    wait_http,
    write_section,
)

DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- instructions:begin -->", "<!-- instructions:end -->"
MODEL = "openai/gpt-4o-mini"
# (label, auth: None = off, "budget" = a key with a budget, "limits" = budget, rpm and tpm)
VARIANTS = [
    ("auth off", None),
    ("auth on, key with a budget", "budget"),
    ("auth on, key with a budget, rpm and tpm", "limits"),
]


def instructions(upstream: str, auth: str | None, requests: int) -> float:
    """User-space instructions per request of a `flowc serve` (ledger on) under callgrind."""
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        project.joinpath("flowc.yaml").write_text("ledger:\n  enabled: true\n")
        env = {**os.environ, "OPENAI_BASE_URL": upstream + "/v1",
               "OPENAI_API_KEY": "sk-bench", "PYTHONPATH": str(ROOT)}
        env.pop("FLOWC_ADMIN_KEY", None)
        # Auth off is sent what a client sends when it is not given a flowc key (as
        # bench_gateway's wrk does): the OpenAI SDK always sends a bearer token.
        headers = {"content-type": "application/json", "authorization": "Bearer sk-bench"}
        if auth:
            env["FLOWC_ADMIN_KEY"] = ADMIN
            headers["authorization"] = f"Bearer {bench_key(project, auth == 'limits')}"
        port, out = free_port(), project / "callgrind.out"
        server = start(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                        f"--callgrind-out-file={out}", sys.executable, "-m", "runtime.cli",
                        "serve", "--port", str(port), "--log-level", "warning"], env, project)
        try:
            wait_http(f"http://127.0.0.1:{port}/health", 300)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            body = json.dumps({"model": MODEL, **CHAT}).encode()

            def send(n: int) -> None:
                for _ in range(n):
                    conn.request("POST", "/v1/chat/completions", body, headers)
                    resp = conn.getresponse()
                    resp.read()
                    assert resp.status == 200, resp.status

            def control(*args: str) -> None:
                subprocess.run(["callgrind_control", *args, str(server.pid)], check=True,
                               capture_output=True)

            send(300)  # imports, caches and the interpreter's specialisation, uncounted
            control("-i", "on")
            send(200)  # callgrind translating the code paths, uncounted
            control("-z")
            send(requests)
            control("-i", "off")
            control("-d")
            time.sleep(0.5)
        finally:
            stop(server)
        total = 0
        for dump in project.glob("callgrind.out*"):
            found = re.search(r"^totals: (\d+)", dump.read_text(), re.M)
            total += int(found.group(1)) if found else 0
        return total / requests


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--print-only", action="store_true", help="do not write the doc")
    args = ap.parse_args()
    counts: dict[str, float] = {}
    up = start(["node", "upstream.mjs"], {**os.environ, "PORT": str(port := free_port())},
               GW)
    try:
        upstream = f"http://127.0.0.1:{port}"
        wait_http(upstream)
        for label, auth in VARIANTS:
            counts[label] = instructions(upstream, auth, args.requests)
            print(f"{label}: {counts[label]:,.0f} instructions a request", flush=True)
    finally:
        stop(up)
    off = counts[VARIANTS[0][0]]
    table = ["| | instructions per request | vs auth off |", "|---|---:|---:|"]
    for label, _ in VARIANTS:
        table.append(f"| {label} | {counts[label]:,.0f} | {counts[label] / off - 1:+.1%} |")
    text = "\n".join(table) + (
        f"\n\nUser-space instructions under callgrind, {args.requests} sequential chat "
        f"completions to `flowc serve` (ledger on) per variant, after an uncounted warm-up. "
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} UTC with "
        "`python benchmarks/bench_instructions.py`.")
    print(text)
    if args.print_only:
        return
    write_section(DOC, BEGIN, END, text, "## Instructions per request, auth off and on")


if __name__ == "__main__":
    main()

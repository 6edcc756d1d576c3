"""Soak: `flowc serve` under steady load for a long time, watching for leaks.

Starts a loopback OpenAI-compatible upstream (tests/fakes.py, in its own process) and
`flowc serve` in front of it, then sends chat completions at a steady rate for --minutes
(default 10), asking for a cost summary every sample. Every --every seconds (default 30) it
samples the resident memory and open file descriptors of the server and of its ledger
process (from /proc). Prints the table, with each process's growth per minute (a
least-squares fit over the last 5 minutes), checks that every answered request has its
ledger row, and writes it into docs/benchmarks.md (--no-write to skip). Exits 1 when a row
is missing, or the ledger process grew faster than --max-slope MB a minute.

    python benchmarks/soak.py [--minutes 10] [--rate 200] [--every 30] [--max-slope 0.1]
                              [--warmup 300000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"
sys.path.insert(0, str(ROOT))

from tests.fakes import free_port, wait_until  # noqa: E402

UPSTREAM = """
import sys, threading
from tests.fakes import FakeServer
fake = FakeServer("openai")
fake.start()
fake.requests = type("Nothing", (), {"append": lambda self, r: None})()  # keep no history
print(fake.url, flush=True)
threading.Event().wait()
"""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def anon_mb(pid: int) -> float:
    """Anonymous resident memory (heap, DuckDB's buffers); the rest of RSS is files mapped
    in (the DuckDB library's code, Python's)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def ledger_child(server_pid: int) -> int:
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return int(pid)
    raise RuntimeError("no ledger process")


async def summary_status(client: httpx.AsyncClient, url: str) -> int:
    """The cost summary's status; 0 when no answer came (a failed sample, not a failed
    soak: a pooled connection the server closed as idle can fail the request)."""
    try:
        return (await client.get(url + "/v1/costs/summary")).status_code
    except httpx.HTTPError:
        return 0


async def drive(url: str, rate: float, seconds: float, every: float,
                sample: callable) -> tuple[int, int]:
    """Send `rate` requests a second for `seconds`, calling `sample` every `every` s."""
    ok = failed = 0
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        sem = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            nonlocal ok, failed
            async with sem:
                try:
                    r = await client.post(url + "/v1/chat/completions", json={
                        "model": "fast", "messages": [{"role": "user", "content": f"m{i}"}]})
                    ok += r.status_code == 200
                    failed += r.status_code != 200
                except httpx.HTTPError:
                    failed += 1

        start = time.monotonic()
        next_sample = start
        tasks: set[asyncio.Task[None]] = set()
        i = 0
        while (now := time.monotonic()) - start < seconds:
            if now >= next_sample:
                sample(now - start, ok, failed, await summary_status(client, url))
                next_sample += every
            due = int((now - start) * rate)
            while i < due:
                t = asyncio.create_task(one(i))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                i += 1
            await asyncio.sleep(0.005)
        await asyncio.gather(*tasks)
        sample(time.monotonic() - start, ok, failed, await summary_status(client, url))
    return ok, failed


async def warm(url: str, n: int) -> int:
    """Send `n` chat completions as fast as 32 connections go; the count answered."""
    ok = 0
    left = iter(range(n))
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def worker() -> None:
            nonlocal ok
            for i in left:
                try:
                    r = await client.post(url + "/v1/chat/completions", json={
                        "model": "fast", "messages": [{"role": "user", "content": f"w{i}"}]})
                    ok += r.status_code == 200
                except httpx.HTTPError:
                    pass

        await asyncio.gather(*(worker() for _ in range(32)))
    return ok


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares growth per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    den = sum((p[0] - mx) ** 2 for p in points)
    return 60 * sum((p[0] - mx) * (p[1] - my) for p in points) / den if den else 0.0


def count_rows(url: str, want: int, wait: float = 15.0) -> int:
    """The ledger's rows, once `want` have landed or `wait` seconds have passed (rows are
    written once a second)."""
    deadline = time.monotonic() + wait
    while True:
        rows = httpx.post(url + "/v1/costs/sql", json={
            "sql": "SELECT count(*) FROM requests"}, timeout=60).json()["rows"][0][0]
        if rows >= want or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=200.0, help="requests per second")
    ap.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--warmup", type=int, default=0, metavar="REQUESTS",
                    help="first send this many requests as fast as they go, unmeasured "
                         "(DuckDB's per-session state for appended rows levels off after "
                         "~250,000)")
    ap.add_argument("--max-slope", type=float, default=None, metavar="MB_PER_MIN",
                    help="exit 1 if the ledger process grew faster than this over the last "
                         "5 minutes (or the second half of a shorter run)")
    args = ap.parse_args()

    # Stopped (a `timeout`, Ctrl-C): the servers started below are stopped too.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    project = Path(tempfile.mkdtemp(prefix="flowc-soak-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
    upstream_url = upstream.stdout.readline().strip()
    (project / "flowc.yaml").write_text("models:\n  fast: openai/gpt-4o-mini\n")
    env.update(OPENAI_BASE_URL=upstream_url + "/v1", OPENAI_API_KEY="sk-soak")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "--port",
                               str(port), "--log-level", "warning"], cwd=project, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    rows: list[tuple[float, int, int, float, float, int, int, int, float]] = []
    try:
        def up() -> bool:
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 60)
        child = ledger_child(server.pid)
        warmed = 0
        if args.warmup:
            t0 = time.monotonic()
            warmed = asyncio.run(warm(url, args.warmup))
            print(f"warm-up: {warmed:,} of {args.warmup:,} answered in "
                  f"{time.monotonic() - t0:.0f} s; ledger {rss_mb(child):.1f} MB", flush=True)

        def sample(t: float, ok: int, failed: int, summary_status: int) -> None:
            row = (t, ok, failed, rss_mb(server.pid), rss_mb(child), fds(server.pid),
                   fds(child), summary_status, anon_mb(child))
            rows.append(row)
            print(f"{t:6.0f} s  ok {ok:>7}  failed {failed:>4}  server {row[3]:6.1f} MB "
                  f"{row[5]:>3} fds  ledger {row[4]:6.1f} MB (anonymous {row[8]:5.1f}) "
                  f"{row[6]:>3} fds  summary {summary_status}", flush=True)

        ok, failed = asyncio.run(drive(url, args.rate, args.minutes * 60, args.every,
                                       sample))
        ledger_rows = count_rows(url, warmed + ok)
    finally:
        for proc in (server, upstream):
            with_group = proc.poll() is None
            if with_group:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)

    # The trend: a least-squares fit over the last 5 minutes (the second half of a shorter
    # run), after the first minutes' warm-up.
    # (A machine too busy to keep the rate leaves a backlog, sampled once more when drained:
    # that sample is left out.)
    end = min(rows[-1][0], args.minutes * 60 + 5)
    tail = min(end / 2, 300.0)
    last = [r for r in rows if end - tail <= r[0] <= end]
    growth = {name: slope([(r[0], r[i]) for r in last])
              for name, i in (("server", 3), ("ledger", 4), ("server fds", 5),
                              ("ledger fds", 6), ("ledger anonymous", 8))}
    # The ledger process saw-tooths between checkpoints (~2.5 MB, ~50 s at 200 rows/s), which
    # tilts a fit of few samples either way; the fit of each minute's lowest sample is the
    # floor's trend.
    lows: dict[int, tuple[float, float]] = {}
    for r in last:
        minute = int((end - r[0]) // 60)
        if minute not in lows or r[4] < lows[minute][1]:
            lows[minute] = (r[0], r[4])
    floor = slope(list(lows.values()))
    lines = ["| t (s) | answered | server RSS (MB) | ledger RSS (MB) | ledger anonymous (MB) "
             "| server fds | ledger fds |", "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r[0]:.0f} | {r[1]:,} | {r[3]:.1f} | {r[4]:.1f} | {r[8]:.1f} | {r[5]} "
              f"| {r[6]} |" for r in rows]
    lines.append("")
    missing = warmed + ok - ledger_rows
    books = "every answered request on the books" if missing <= 0 else f"{missing:,} MISSING"
    if warmed:
        lines.append(f"After a warm-up of {warmed:,} requests (not in the table):")
    kept = (last[-1][1] - last[0][1]) / (last[-1][0] - last[0][0]) if len(last) > 1 else 0
    lines.append(f"{args.minutes:g} minutes at {args.rate:g} requests/s ({kept:,.0f}/s answered "
                 f"over the last {tail / 60:.3g} minutes): {ok:,} answered, "
                 f"{failed} failed, {ledger_rows:,} ledger rows ({books}); every cost "
                 "summary answered "
                 f"{'200' if all(r[7] == 200 for r in rows) else 'NOT always 200'}. "
                 f"Growth over the last {tail / 60:.3g} minutes (least squares), per minute: "
                 f"server {growth['server']:+.2f} MB, ledger process {growth['ledger']:+.2f} MB "
                 f"(anonymous {growth['ledger anonymous']:+.2f}; each minute's low "
                 f"{floor:+.2f}), "
                 f"fds {growth['server fds']:+.2f} / {growth['ledger fds']:+.2f}.")
    table = "\n".join(lines)
    print("\n" + table)
    if not args.no_write:
        text = DOC.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            text = head + BEGIN + "\n" + table + "\n" + END + rest.split(END, 1)[1]
        else:
            text += (f"\n## Soak (benchmarks/soak.py)\n\n{BEGIN}\n{table}\n{END}\n")
        DOC.write_text(text)
    if missing > 0 or (args.max_slope is not None and growth["ledger"] > args.max_slope):
        sys.exit(1)


if __name__ == "__main__":
    main()

"""The shared Postgres store against the embedded ledger, side by side in one run.

1. Per-instance requests/s at concurrency 32 (wrk, chat completions against a loopback
   upstream that answers at once, benchmarks/gateway/upstream.mjs): one `flowc serve` with
   the embedded DuckDB ledger and one with `--store postgresql://...`, both up, wrk
   alternating between them; the median of the rounds' ratios counts (a shared 2-core
   machine drifts more between runs than the difference being measured), with each
   side's CPU per request (flowc's process tree, and Postgres's). Every request is a
   ledger row.
2. Ledger ingest into Postgres from one instance (runtime/pg/ledger.py): rows recorded as
   fast as one thread can (each one written to the spool), then sent; rows/s from the
   first row recorded to the last committed, and for the sending alone.

Postgres is a throwaway cluster (tests/pgserver.py: Debian's package, `fsync=off`, on the
same machine). Writes the results into docs/benchmarks.md ("Postgres store").

    python benchmarks/bench_store.py [--duration 5] [--rows 500000] [--print-only]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from bench_gateway import GW, free_port, start, stop, wait_http, wrk  # noqa: E402

from runtime.ledger.store import CallRecord  # noqa: E402
from runtime.pg.ledger import PgLedger  # noqa: E402
from tests.pgserver import PostgresServer  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- store:begin -->", "<!-- store:end -->"
MODEL = "openai/gpt-4o-mini"
ROUNDS = 6  # alternating wrk runs against each server


def serve(upstream: str, store: str | None, procs: list) -> tuple[str, int]:
    """One instance, warmed up: its chat completions URL and its pid."""
    project = tempfile.mkdtemp()
    Path(project, "flowc.yaml").write_text("ledger:\n  flush_interval: 1\n")
    port = free_port()
    env = {**os.environ, "OPENAI_BASE_URL": upstream + "/v1", "OPENAI_API_KEY": "sk-bench",
           "PYTHONPATH": str(ROOT)}
    env.pop("FLOWC_ADMIN_KEY", None)
    env.pop("FLOWC_STORE_URL", None)
    extra = ["--store", store, "--instance", "bench"] if store else []
    procs.append(start([sys.executable, "-m", "runtime.cli", "serve", "--port", str(port),
                        "--log-level", "warning", *extra], env, Path(project)))
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health")
    wrk(url + "/v1/chat/completions", MODEL, 8, 3, {})  # warm up
    return url + "/v1/chat/completions", procs[-1].pid


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def tree_cpu(root: int) -> float:
    """CPU seconds used so far by ``root`` and its live children (a server's ledger
    process; Postgres's backends)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat(int(entry.name))
        except OSError:
            continue
        if int(entry.name) == root or int(fields[1]) == root:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def ingest(url: str, rows: int) -> tuple[float, float]:
    """(rows/s recorded through sent, rows/s of the sending alone)."""
    with tempfile.TemporaryDirectory() as spool:
        # A long interval: the sending is timed on its own, after every row is spooled.
        ledger = PgLedger(url, Path(spool), "bench", flush_interval=60)
        try:
            call = CallRecord(model="fast", provider="openai", served_model="gpt-4o-mini",
                              success=True, latency_ms=12.5, prompt_tokens=19,
                              completion_tokens=10, cost_usd=Decimal("0.0000085"),
                              price_source="genai-prices", team="red", key_id="k1",
                              key_name="bot", tags="env=prod")
            import runtime.pg.ledger as pgl

            pgl._BATCH = rows + 1  # no early wake: all rows wait until the flush
            t0 = time.perf_counter()
            for _ in range(rows):
                call.ts = time.time()
                ledger.record(call)
            t1 = time.perf_counter()
            ledger.flush()
            t2 = time.perf_counter()
            assert ledger.sent == rows, (ledger.sent, ledger.status())
        finally:
            ledger.close()
    return rows / (t2 - t0), rows / (t2 - t1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--print-only", action="store_true")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    pg = PostgresServer()
    procs = []
    try:
        up_port = free_port()
        procs.append(start(["node", "upstream.mjs"], {**os.environ, "PORT": str(up_port)}, GW))
        upstream = f"http://127.0.0.1:{up_port}"
        wait_http(upstream)
        url = pg.fresh_database()
        postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
        servers = {"embedded": serve(upstream, None, procs),
                   "postgres": serve(upstream, url, procs)}
        runs: dict[str, list[dict]] = {"embedded": [], "postgres": []}
        # Both servers stay up; wrk alternates between them, and each round's pair is
        # compared: a shared machine drifts between runs by more than the difference.
        for i in range(ROUNDS):
            for which in (("embedded", "postgres") if i % 2 == 0 else
                          ("postgres", "embedded")):
                target, pid = servers[which]
                cpu0, pg0 = tree_cpu(pid), tree_cpu(postmaster)
                m = wrk(target, MODEL, 32, args.duration, {})
                m["cpu_us"] = (tree_cpu(pid) - cpu0) * 1e6 / m["requests"]
                m["pg_us"] = (tree_cpu(postmaster) - pg0) * 1e6 / m["requests"]
                runs[which].append(m)
                print(which, m, flush=True)
        best = {k: max(v, key=lambda m: m["rps"]) for k, v in runs.items()}
        all_rps = {k: ", ".join(f"{m['rps']:.0f}" for m in v) for k, v in runs.items()}
        ratios = [p["rps"] / e["rps"] for e, p in zip(runs["embedded"], runs["postgres"],
                                                       strict=True)]
        median = statistics.median
        cpu = {k: (median(m["cpu_us"] for m in v), median(m["pg_us"] for m in v))
               for k, v in runs.items()}
        through, send = ingest(pg.fresh_database(), args.rows)
        print(f"ingest: {through:,.0f} rows/s recorded through committed; "
              f"{send:,.0f} rows/s sending", flush=True)
    finally:
        for p in procs:
            stop(p)
        pg.close()
    ratio = statistics.median(ratios) - 1
    busy = max(load, os.getloadavg()[0])
    lines = [
        BEGIN,
        "## Postgres store (`flowc serve --store`)",
        "",
        "`python benchmarks/bench_store.py`: two instances up at once, one with the "
        "embedded ledger and one with `--store postgresql://...`, chat completions against "
        "a loopback upstream that answers at once; wrk at concurrency 32 alternates "
        f"between them, {ROUNDS} rounds of {args.duration} s each, and each round's pair "
        "is compared (the median of the ratios counts). Postgres 15 on the same machine "
        "(tests/pgserver.py, `fsync=off`), so its work shares the two cores with flowc, "
        "wrk and the upstream. Load average "
        f"{busy:.1f} on 2 cores when it ran"
        + (" (a busy machine: other work shared the cores)." if busy > 1.5 else "."),
        "",
        "| store | req/s (c=32, best round) | p50 ms | p99 ms | flowc CPU per request "
        "(us, with its ledger process) | Postgres CPU per request (us) | rounds (req/s) |",
        "|---|---:|---:|---:|---:|---:|---|",
        *(f"| {k} | {m['rps']:.0f} | {m['p50']:.2f} | {m['p99']:.2f} | {cpu[k][0]:.0f} | "
          f"{cpu[k][1]:.0f} | {all_rps[k]} |" for k, m in best.items()),
        "",
        f"Postgres store against embedded: {ratio:+.1%} req/s (median of the rounds' "
        "ratios).",
        "",
        f"Ledger ingest into Postgres from one instance ({args.rows:,} rows): "
        f"{through:,.0f} rows/s from the first row recorded (each one written to the spool) "
        f"to the last committed; the sending alone (COPY into staging, INSERT into the day "
        f"partition) {send:,.0f} rows/s.",
        END,
    ]
    text = "\n".join(lines)
    print(text)
    if args.print_only:
        return
    doc = DOC.read_text()
    if BEGIN in doc:
        doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: text, doc,
                     flags=re.S)
    else:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    DOC.write_text(doc)


if __name__ == "__main__":
    main()

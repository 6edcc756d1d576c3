"""Ledger speed: ingest rate with the event loop's lag, and spend queries over 10M rows.

    python benchmarks/bench_ledger.py [--rows 500000] [--big 10000000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from decimal import Decimal
from pathlib import Path

from runtime.ledger.store import CallRecord, Ledger


async def ingest(ledger: Ledger, rows: int, writers: int = 50) -> tuple[float, float]:
    lags: list[float] = []
    stop = False

    async def ticker() -> None:
        while not stop:
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append((time.perf_counter() - t0) * 1000 - 1.0)

    async def writer(n: int) -> None:
        for i in range(n):
            ledger.record(CallRecord(model="fast", provider="openai",
                                     served_model="gpt-4o-mini", success=True,
                                     latency_ms=1.5, prompt_tokens=100 + i % 7,
                                     completion_tokens=20, cost_usd=Decimal("0.000027"),
                                     workflow_name="bench", step_id="s"))
            if i % 100 == 0:
                await asyncio.sleep(0)

    tick = asyncio.create_task(ticker())
    t0 = time.perf_counter()
    await asyncio.gather(*(writer(rows // writers) for _ in range(writers)))
    await asyncio.to_thread(ledger.flush)
    elapsed = time.perf_counter() - t0
    stop = True
    await tick
    lags.sort()
    return rows / elapsed, lags[int(len(lags) * 0.99)] if lags else 0.0


def big_query(path: Path, n: int) -> list[tuple[str, float]]:
    ledger = Ledger(path)
    ledger.execute(f"""
        INSERT INTO requests (id, ts, workflow_name, model, provider, served_model,
            prompt_tokens, completion_tokens, total_tokens, cost_usd, latency_ms, success)
        SELECT i::VARCHAR, TIMESTAMP '2026-01-01' + to_seconds(i % 31536000),
               'wf' || (i % 20), 'alias' || (i % 8), 'openai', 'model-' || (i % 12),
               100 + i % 50, 20 + i % 10, 120 + i % 60, (i % 1000) / 1e6, 50 + i % 300,
               i % 50 <> 0
        FROM range({n}) t(i)""")
    queries = {
        "spend by day and model": "SELECT ts::DATE AS day, provider, served_model, "
                                  "sum(cost_usd) FROM requests GROUP BY 1, 2, 3",
        "spend by day": "SELECT ts::DATE, sum(cost_usd), count(*) FROM requests GROUP BY 1",
        "latency p50/p99 by model": "SELECT served_model, quantile_cont(latency_ms, 0.5), "
                                    "quantile_cont(latency_ms, 0.99) FROM requests GROUP BY 1",
    }
    out = []
    for label, sql in queries.items():
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            ledger.select(sql)
            times.append(time.perf_counter() - t0)
        out.append((label, statistics.median(times)))
    ledger.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--big", type=int, default=10_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(Path(tmp) / "ingest.duckdb", flush_interval=1.0, in_process=False)
        rate, lag = asyncio.run(ingest(ledger, args.rows))
        ledger.close()
        print(f"ingest: {rate:,.0f} rows/s from 50 concurrent writers, "
              f"event-loop lag p99 {lag:.2f} ms")
        for label, seconds in big_query(Path(tmp) / "big.duckdb", args.big):
            print(f"{label} over {args.big:,} rows: {seconds * 1000:.0f} ms")


if __name__ == "__main__":
    main()

"""Ledger speed: ingest rate with the event loop's lag, and spend queries over 10M rows.

    python benchmarks/bench_ledger.py [--rows 500000] [--rate 100000] [--repeat 3]
                                       [--big 10000000]

Ingest is measured two ways, each until every row is in the ledger file, with the event
loop's lag sampled every millisecond: a burst offered as fast as the writers can make rows
(the most the ledger takes), and a steady rate offered in small slices as finished requests
would (the lag at that rate). Each also runs against a sink that drops rows, to show the
lag the producer causes by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from runtime.ledger.store import CallRecord, Ledger


def _record(sink: Any, i: int) -> None:
    sink.record(CallRecord(model="fast", provider="openai", served_model="gpt-4o-mini",
                           success=True, latency_ms=1.5, prompt_tokens=100 + i % 7,
                           completion_tokens=20, cost_usd=Decimal("0.000027"),
                           workflow_name="bench", step_id="s"))


class NullSink:
    """Takes records and drops them: the producer's own cost, for comparison."""

    def record(self, call: CallRecord) -> None:
        pass

    def flush(self) -> None:
        pass


async def _measure(sink: Any, writers: int, write: Any) -> tuple[float, float, float]:
    """Run `writers` copies of `write`, then wait until every row is in the ledger.
    Returns (seconds until then, of which seconds after the last row was offered, event-loop
    lag p99 in ms)."""
    lags: list[float] = []
    stop = False

    async def ticker() -> None:
        while not stop:
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append((time.perf_counter() - t0) * 1000 - 1.0)

    tick = asyncio.create_task(ticker())
    t0 = time.perf_counter()
    await asyncio.gather(*(write() for _ in range(writers)))
    offered = time.perf_counter()
    await asyncio.to_thread(sink.flush)
    done = time.perf_counter()
    stop = True
    await tick
    lags.sort()
    return done - t0, done - offered, lags[int(len(lags) * 0.99)] if lags else 0.0


async def burst(sink: Any, rows: int, writers: int = 50) -> tuple[float, float]:
    """`rows` offered as fast as 50 writers can make them (each yields every 10 rows).
    Returns (rows/s until all are written, lag p99 ms)."""
    async def write() -> None:
        for i in range(rows // writers):
            _record(sink, i)
            if i % 10 == 0:
                await asyncio.sleep(0)

    elapsed, _, lag = await _measure(sink, writers, write)
    return rows / elapsed, lag


async def paced(sink: Any, rate: int, seconds: float, writers: int = 50
                ) -> tuple[float, float]:
    """`rate` rows/s offered for `seconds` by 50 writers that wake every millisecond, as
    requests finishing on a busy server would. Returns (ms from the last row offered until
    all are written, lag p99 ms): the ledger keeps up when the first stays well under the
    flush interval (1 s)."""
    per_writer = rate / writers

    async def write() -> None:
        start, done = time.perf_counter(), 0
        while (now := time.perf_counter() - start) < seconds:
            due = int(now * per_writer) - done
            for i in range(due):
                _record(sink, done + i)
            done += due
            await asyncio.sleep(0.001)
        for i in range(int(seconds * per_writer) - done):
            _record(sink, i)

    _, drain, lag = await _measure(sink, writers, write)
    return drain * 1000, lag


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


def _spread(values: list[float], fmt: str) -> str:
    lo, mid, hi = min(values), statistics.median(values), max(values)
    return f"{mid:{fmt}} (range {lo:{fmt}}-{hi:{fmt}})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--rate", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--big", type=int, default=10_000_000)
    args = ap.parse_args()
    gc.collect()
    gc.freeze()  # as `flowc serve` does once it has started
    with tempfile.TemporaryDirectory() as tmp:
        scenarios = (
            (f"burst of {args.rows:,} rows", lambda s: burst(s, args.rows),
             "{} rows/s until all were written"),
            (f"{args.rate:,} rows/s offered for {args.seconds:g} s",
             lambda s: paced(s, args.rate, args.seconds),
             "all rows written {} ms after the last was offered"))
        for n, (label, run, result) in enumerate(scenarios):
            values, lags, alone = [], [], []
            for k in range(args.repeat):
                alone.append(asyncio.run(run(NullSink()))[1])
                ledger = Ledger(Path(tmp) / f"ingest-{n}-{k}.duckdb", in_process=False)
                value, lag = asyncio.run(run(ledger))
                ledger.close()
                values.append(value)
                lags.append(lag)
            print(f"ingest, {label}, {args.repeat} runs: "
                  f"{result.format(_spread(values, ',.0f'))}; event-loop lag p99 "
                  f"{_spread(lags, '.2f')} ms (producer alone {_spread(alone, '.2f')} ms)")
        for label, seconds in big_query(Path(tmp) / "big.duckdb", args.big):
            print(f"{label} over {args.big:,} rows: {seconds * 1000:.0f} ms")


if __name__ == "__main__":
    main()

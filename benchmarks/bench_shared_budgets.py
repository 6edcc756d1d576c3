"""What a budget shared by instances on Postgres costs per request, against the embedded one.

In one process and one event loop, as `flowc serve` runs them: the gate's per-call work
(rate-limit window, budget reservation at the worst case, the charge of the real cost, the
release) for a key with a budget, rpm and tpm, with the embedded counters and then with
the shared ones (runtime/pg/access.py) syncing with a throwaway Postgres every 0.25 s.
Calls go in waves of 32 in flight (c=32), each wave yielding to the loop once (so the
sync runs as it would under load). Reports microseconds a call, the leases asked for on
the request path (a round trip each, off the event loop) and the store's statements a second.

    python benchmarks/bench_shared_budgets.py [--calls 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flowc.config import ProjectConfig
from runtime.access.gate import Gate, Principal
from runtime.access.store import LedgerAccessStore
from runtime.ledger.pricing import price
from runtime.ledger.store import Ledger
from runtime.pg import access as shared
from runtime.providers import Target
from runtime.providers.base import Usage

MINI = Target("openai", "gpt-4o-mini")
REQ = {"model": "fast", "max_tokens": 400, "messages": [{"role": "user", "content": "hi"}]}
USAGE = Usage(prompt_tokens=300, completion_tokens=250)
COST = price("openai", "gpt-4o-mini", USAGE)[0]
SPEC = {"name": "bench", "budget_usd": "1000000", "rpm": 10**9, "tpm": 10**12}


async def run(gate: Gate, who: Principal, calls: int, wave: int = 32) -> float:
    """Seconds for ``calls`` calls through the gate, ``wave`` in flight at a time."""
    t0 = time.perf_counter()
    for _ in range(calls // wave):
        grants = [await gate.admit_wait(who, "fast", [MINI], REQ, 200, None, None)
                  for _ in range(wave)]
        await asyncio.sleep(0)
        for g in grants:
            assert g is not None
            g.charge(COST, USAGE)
            g.close()
    return time.perf_counter() - t0


def statements(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT xact_commit FROM pg_stat_database "
                           "WHERE datname = current_database()").fetchone()
    return int(row[0]) if row else 0


async def embedded(calls: int, rounds: int) -> list[float]:
    with tempfile.TemporaryDirectory() as d:
        ledger = Ledger(Path(d) / "ledger.duckdb")
        try:
            gate = Gate(ProjectConfig(), LedgerAccessStore(ledger), None)
            gate.load()
            key, _ = gate.create(SPEC)
            who = Principal("key", key)
            return [await run(gate, who, calls) / calls * 1e6 for _ in range(rounds)]
        finally:
            ledger.close()


async def on_postgres(url: str, calls: int, rounds: int) -> tuple[list[float], int, float]:
    grants = 0
    store = shared.PgAccessStore(url)
    original = store.grant

    async def counted(*args: Any) -> bool:
        nonlocal grants
        grants += 1
        return await original(*args)

    store.grant = counted  # type: ignore[method-assign]
    gate = Gate(ProjectConfig(), store, None)
    gate.load()
    key, _ = gate.create(SPEC)
    who = Principal("key", key)
    await asyncio.sleep(2 * shared.TICK)
    before, t0 = statements(url), time.perf_counter()
    out = [await run(gate, who, calls) / calls * 1e6 for _ in range(rounds)]
    per_s = (statements(url) - before) / (time.perf_counter() - t0)
    await store.aclose()
    return out, grants, per_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from tests.pgserver import PostgresServer

    pg = PostgresServer()
    try:
        url = pg.fresh_database()
        # Alternate, so a busy machine's drift falls on both.
        emb: list[float] = []
        pgs: list[float] = []
        grants, per_s = 0, 0.0
        for _ in range(2):
            emb += asyncio.run(embedded(args.calls, args.rounds))
            got, g, s = asyncio.run(on_postgres(url, args.calls, args.rounds))
            pgs += got
            grants, per_s = grants + g, max(per_s, s)
        e, p = statistics.median(emb), statistics.median(pgs)
        print(f"embedded budget: {e:.2f} us a call (median of {len(emb)} rounds of "
              f"{args.calls:,})")
        print(f"shared budget on Postgres: {p:.2f} us a call ({p - e:+.2f} us); "
              f"{grants} leases asked for (off the event loop) over "
              f"{2 * args.rounds * args.calls:,} calls; the store saw {per_s:.0f} "
              "transactions a second from this instance")
    finally:
        pg.close()


if __name__ == "__main__":
    main()

"""for_each speed: a map over 1,000 items of a 10 ms step with `max_concurrency: 100`
(ideal: 10 waves of 10 ms = 100 ms; target: under 150 ms of scheduling overhead over
that), and the scheduling cost per item on a map of 1,000 no-op items (target: under
0.2 ms an item). Model calls are an in-process stand-in (benchmarks/bench_runtime.py's
Sleeper); uvloop, as `flowc serve` runs.

    python benchmarks/bench_foreach.py
"""

from __future__ import annotations

import os
import statistics
import time

from benchmarks.bench_runtime import Sleeper
from flowc import compile_source
from runtime.executor import Executor

MAP = """\
name: map
inputs:
  docs: {type: array}
steps:
  - id: each
    type: llm
    model: gpt-4o-mini
    for_each: ${input.docs}
    as: doc
    max_concurrency: %d
    prompt: "p ${doc}"
output: ${each}
"""


async def timed(items: int, delay: float, concurrency: int) -> float:
    compiled = compile_source(MAP % concurrency, "map.yaml").compiled
    assert compiled is not None
    ex = Executor(Sleeper(delay))
    docs = [f"doc {i}" for i in range(items)]
    await ex.run(compiled, {"docs": docs})  # warm up
    t0 = time.perf_counter()
    result = await ex.run(compiled, {"docs": docs})
    elapsed = time.perf_counter() - t0
    assert result.status == "succeeded" and len(result.output) == items
    return elapsed


def main() -> None:
    import uvloop

    load = os.getloadavg()[0]
    runs = [uvloop.run(timed(1000, 0.010, 100)) for _ in range(5)]
    best, median = min(runs) * 1000, statistics.median(runs) * 1000
    print(f"for_each over 1,000 items of a 10 ms step, max_concurrency 100: best {best:.0f} ms, "
          f"median {median:.0f} ms (ideal 100 ms; overhead {best - 100:.0f} ms best, "
          f"{median - 100:.0f} ms median)")
    runs = [uvloop.run(timed(1000, 0, 100)) for _ in range(5)]
    print(f"for_each over 1,000 no-op items: best {min(runs) * 1000:.0f} ms, "
          f"{min(runs):.3f} ms per item (median {statistics.median(runs):.3f} ms per item)")
    print(f"load average (1 min) at the start: {load:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()

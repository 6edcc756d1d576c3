"""Block speed: a map over 1,000 items whose body is a block of two 10 ms steps, the
second reading the first, with `max_concurrency: 100` (ideal: 10 waves of 20 ms = 200 ms),
and the scheduling cost per item of a block of two no-op steps (each item is a nested run
of two steps; the issue's target for a step is under 0.2 ms). Model calls are an in-process
stand-in (benchmarks/bench_runtime.py's Sleeper); uvloop, as `flowc serve` runs.

    python benchmarks/bench_block.py
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
    type: block
    for_each: ${input.docs}
    as: doc
    max_concurrency: 100
    steps:
      - {id: first, type: llm, model: gpt-4o-mini, prompt: "p ${doc}"}
      - {id: second, type: llm, model: gpt-4o-mini, prompt: "p ${first}"}
    output: {first: "${first}", second: "${second}"}
output: ${each}
"""


async def timed(items: int, delay: float) -> float:
    compiled = compile_source(MAP, "map.yaml").compiled
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
    runs = [uvloop.run(timed(1000, 0.010)) for _ in range(5)]
    best, median = min(runs) * 1000, statistics.median(runs) * 1000
    print(f"a block of two 10 ms steps over 1,000 items, max_concurrency 100: best "
          f"{best:.0f} ms, median {median:.0f} ms (ideal 200 ms; overhead {best - 200:.0f} ms "
          f"best, {median - 200:.0f} ms median)")
    runs = [uvloop.run(timed(1000, 0)) for _ in range(5)]
    print(f"a block of two no-op steps over 1,000 items: best {min(runs) * 1000:.0f} ms, "
          f"{min(runs):.3f} ms per item, {min(runs) / 2:.3f} ms per inner step (median "
          f"{statistics.median(runs):.3f} ms per item)")
    print(f"load average (1 min) at the start: {load:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()

"""Scheduler speed: overhead per step on a 1,000-step DAG of no-op steps, and a width-100
fan-out of 100 ms steps (should take ~100 ms, not 100 x 100 ms).

    python benchmarks/bench_runtime.py
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any

from flowc import compile_source
from runtime.executor import Executor
from runtime.gateway.calls import NO_CONTEXT, CallContext, Outcome
from runtime.providers import Target, Usage


class Sleeper:
    """A model stand-in that answers after ``delay`` seconds (0 = a no-op step); the join
    step (whose prompt is its inputs' answers) answers at once."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def complete(self, req: dict[str, Any], *, tags: str | None = None,
                       ctx: CallContext = NO_CONTEXT) -> Outcome:
        if self.delay and req["messages"][-1]["content"].startswith("p"):
            await asyncio.sleep(self.delay)
        body = {"choices": [{"message": {"role": "assistant", "content": "ok"}}]}
        return Outcome(body, Target("bench", "m"), Usage(), Decimal(0), 0.0, None)


def chain(n: int) -> str:
    lines = ["name: chain", "steps:"]
    for i in range(n):
        prev = f" ${{s{i - 1}}}" if i else ""
        lines.append(f"  - {{id: s{i}, type: llm, model: gpt-4o-mini, prompt: 'p{prev}'}}")
    lines.append(f"output: ${{s{n - 1}}}")
    return "\n".join(lines) + "\n"


def fan(n: int) -> str:
    lines = ["name: fan", "steps:"]
    for i in range(n):
        lines.append(f"  - {{id: s{i}, type: llm, model: gpt-4o-mini, prompt: 'p{i}'}}")
    reads = " ".join(f"${{s{i}}}" for i in range(n))
    lines.append(f"  - {{id: join, type: llm, model: gpt-4o-mini, prompt: '{reads}'}}")
    lines.append("output: ${join}")
    return "\n".join(lines) + "\n"


async def timed(text: str, delay: float, concurrency: int = 256) -> float:
    compiled = compile_source(text, "b.yaml").compiled
    assert compiled is not None
    ex = Executor(Sleeper(delay), max_concurrency=concurrency)
    await ex.run(compiled, {})  # warm up
    t0 = time.perf_counter()
    result = await ex.run(compiled, {})
    assert result.status == "succeeded"
    return time.perf_counter() - t0


def main() -> None:
    import uvloop

    for n in (1000,):
        t = uvloop.run(timed(chain(n), 0))
        print(f"1,000-step chain of no-op steps: {t * 1000:.0f} ms, "
              f"{t / n * 1000:.3f} ms per step")
        t = uvloop.run(timed(fan(n - 1), 0))
        print(f"1,000-step fan-out/fan-in of no-op steps: {t * 1000:.0f} ms, "
              f"{t / n * 1000:.3f} ms per step")
    t = uvloop.run(timed(fan(100), 0.1))
    print(f"width-100 fan-out of 100 ms steps, then an instant join: {t * 1000:.0f} ms")


if __name__ == "__main__":
    main()

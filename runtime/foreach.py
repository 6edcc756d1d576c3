"""Running a `for_each:` step (flowc/foreach.py): the body once per item, at most
`max_concurrency` at once, each with its own `when:`, `retries:`, `timeout:` and
`on_error:`.

A fixed pool of workers takes the next index, so a 1,000-item map makes `max_concurrency`
tasks, not 1,000. The result keeps the items' order; an item that was skipped or failed
(under `on_error: continue`) is null there. Each item's model calls carry `step[i]` as the
ledger's `step_id`, and the step's record lists every item (`items`).
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from flowc.expr import resolve_ref
from flowc.foreach import DEFAULT_CONCURRENCY
from runtime import frame

if TYPE_CHECKING:
    from flowc.ir import StepNode
    from runtime.executor import StepResult, _Run


async def run_foreach(run: _Run, node: StepNode, r: StepResult) -> list[Any]:
    from runtime.executor import BudgetExceeded, StepFailed, StepResult, _describe

    step = node.step
    assert node.items is not None
    items = resolve_ref(node.items, run.scope)
    if not isinstance(items, list):
        raise StepFailed(f"for_each needs a list; {step.for_each} is a "
                         f"{type(items).__name__}")
    n = len(items)
    out: list[Any] = [None] * n
    records: list[dict[str, Any]] = [{"index": i, "status": "pending"} for i in range(n)]
    r.items = records
    base, outer, name = frame.label(step.id), frame.NAMES.get() or {}, step.as_
    limit = run.ex.global_limit
    pending = iter(range(n))
    r.attempts = 0

    async def one(i: int) -> None:
        item = items[i]
        frame.NAMES.set({**outer, name: item})
        frame.LABEL.set(f"{base}[{i}]")
        rec = StepResult(f"{step.id}[{i}]")
        t0 = time.perf_counter()
        try:
            reason = "the item is missing (null)" if item is None else run._skip_reason(node)
            if reason is not None:
                rec.status, rec.skip_reason = "skipped", reason
            elif limit is not None:
                rec.status = "running"
                async with limit:
                    out[i] = await run.body(node, rec)
                rec.status = "done"
            else:
                rec.status = "running"
                out[i] = await run.body(node, rec)
                rec.status = "done"
        except Exception as exc:
            rec.status, rec.error = "failed", rec.error or _describe(exc)
            if step.on_error != "continue" or isinstance(exc, BudgetExceeded):
                if isinstance(exc, BudgetExceeded):
                    raise
                raise StepFailed(f"item {i}: {rec.error}") from None
        finally:
            if rec.status == "running":  # cancelled: another item failed the step
                rec.status = "cancelled"
            rec.latency_ms = (time.perf_counter() - t0) * 1000
            records[i] = _record(i, rec)
            _add(r, rec, i)

    async def worker() -> None:
        for i in pending:
            await one(i)

    workers = [asyncio.create_task(worker()) for _ in
               range(min(step.max_concurrency or DEFAULT_CONCURRENCY, n))]
    if not workers:
        return out
    try:
        done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return out


def _record(i: int, rec: StepResult) -> dict[str, Any]:
    out: dict[str, Any] = {"index": i, "status": rec.status, "attempts": rec.attempts,
                           "latency_ms": round(rec.latency_ms, 1)}
    if rec.error:
        out["error"] = rec.error
    if rec.skip_reason:
        out["skip_reason"] = rec.skip_reason
    if rec.steps is not None:
        out["steps"] = [s.to_dict() for s in rec.steps.values()]
    return out


def _add(r: StepResult, rec: StepResult, i: int) -> None:
    """An item's calls and costs go on the step's record."""
    r.calls.extend({**c, "item": i} for c in rec.calls)
    r.tokens += rec.tokens
    r.model_calls += rec.model_calls
    r.tool_calls += rec.tool_calls
    r.attempts += rec.attempts
    r.cost = None if r.cost is None or rec.cost is None else r.cost + (rec.cost or Decimal(0))

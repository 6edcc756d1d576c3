"""The budget: a pipeline's `max_cost_usd:` against the worst case of a run (flowc.cost).

Only a pipeline that declares a budget pays for the price data's import (~200 ms)."""

from __future__ import annotations

from flowc.context import Context
from flowc.ir import CompiledPipeline


def check_budget(ctx: Context, compiled: CompiledPipeline) -> None:
    if compiled.pipeline.max_cost_usd is None:
        return
    from flowc.cost import pipeline_cost, usd

    rc = pipeline_cost(compiled, ctx.config, ctx.catalog)
    span = ctx.source.span_of(("max_cost_usd",))
    assert rc.budget is not None
    if rc.worst_usd is None:
        first = next(s for s in rc.steps if s.runs != "never" and s.kind == rc.kind)
        ctx.out.add("unbounded-cost",
                    f"max_cost_usd {usd(rc.budget)} cannot be checked: a run's worst case is "
                    f"{rc.kind}: {rc.problem}", span.start, span.end, help=first.fix)
    elif rc.over_budget:
        top = sorted((s for s in rc.steps if s.worst_usd), key=lambda s: -s.worst_usd)[:3]  # type: ignore[operator]
        costliest = ", ".join(f"'{s.step_id}' {usd(s.worst_usd)}" for s in top)
        ctx.out.add("over-budget",
                    f"a run's worst case, {usd(rc.worst_usd)}, is above max_cost_usd "
                    f"{usd(rc.budget)} (costliest steps: {costliest})", span.start, span.end,
                    help="lower those steps' max_tokens, retries or inputs' max_length, use "
                         "a cheaper model, or raise max_cost_usd (`flowc cost` shows the "
                         "breakdown)")

"""`cache:` checks: a cached model step that offers MCP tools."""

from __future__ import annotations

from flowc.caching import cache_of
from flowc.context import Context
from flowc.model import LLMStep


def check_caching(ctx: Context) -> None:
    """A cache hit reuses the model's final answer: the tool calls it made on the way (and
    their effects: a ticket filed, a message sent) do not happen again."""
    for info in ctx.steps.values():
        step = info.step
        if isinstance(step, LLMStep) and step.tools and cache_of(step)[0]:
            span = ctx.source.span_of((*ctx.step_path(step.id), "cache"))
            ctx.out.add("cached-tool-calls",
                        f"step '{step.id}' is cached and offers MCP tools: a cache hit reuses "
                        "the answer without making the tool calls again",
                        span.start, span.end,
                        help="leave `cache:` off if the tools must run each time (they act), "
                             "or silence this with `# flowc: ignore[cached-tool-calls]`")

"""Calling a model: routing, retries with backoff, fallbacks, cost, and one ledger row per
attempt. The HTTP gateway and pipeline steps both call models through here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

from flowc.config import ProjectConfig
from runtime.gateway.routing import Plan, Router, Traits
from runtime.ledger.pricing import price
from runtime.ledger.store import CallRecord, Ledger
from runtime.providers import (
    FlowcError,
    Providers,
    StreamState,
    Target,
    UpstreamError,
    Usage,
)

log = logging.getLogger("flowc.gateway")
T = TypeVar("T")


@dataclass(frozen=True)
class CallContext:
    """Who made the call: a pipeline run's step, or a plain gateway request."""

    workflow_name: str | None = None
    run_id: str | None = None
    step_id: str | None = None
    dry_run: bool = False


NO_CONTEXT = CallContext()


@dataclass
class Outcome:
    body: dict[str, Any]
    target: Target
    usage: Usage
    cost: Decimal | None
    upstream_ms: float
    rule: str | None


@dataclass
class StreamOutcome:
    chunks: AsyncIterator[dict[str, Any]]  # the first chunk already read is replayed
    target: Target
    rule: str | None
    state: StreamState
    finish: Any = field(default=None)  # called once the stream ends: records the ledger row


class ModelCaller:
    def __init__(self, config: ProjectConfig, providers: Providers, router: Router,
                 ledger: Ledger | None) -> None:
        self.config = config
        self.providers = providers
        self.router = router
        self.ledger = ledger

    # -- bookkeeping -----------------------------------------------------------------------
    def _record(self, requested: str, target: Target | None, served: str | None, *,
                ok: bool, latency_ms: float, usage: Usage | None, ctx: CallContext,
                rule: str | None, stream: bool, error: Exception | None = None,
                ttft_ms: float | None = None) -> Decimal | None:
        cost, source = (None, None)
        if usage is not None and target is not None:
            cost, source = price(target.provider, target.model, usage, self.config.prices)
        if ok and target is not None:
            self.router.latency.add(target, latency_ms)
        if self.ledger is not None:
            u = usage or Usage()
            self.ledger.record(CallRecord(
                model=requested, provider=target.provider if target else None,
                served_model=served or (target.model if target else None), success=ok,
                latency_ms=latency_ms, prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens, cached_tokens=u.cached_tokens,
                cache_write_tokens=u.cache_write_tokens, reasoning_tokens=u.reasoning_tokens,
                cache_write_1h_tokens=u.cache_write_1h_tokens,
                cost_usd=cost, price_source=source, ttft_ms=ttft_ms,
                error=str(getattr(error, "message", error)) if error else None,
                error_class=type(error).__name__ if error else None, route=rule,
                stream=stream, dry_run=ctx.dry_run, workflow_name=ctx.workflow_name,
                run_id=ctx.run_id, step_id=ctx.step_id))
        return cost

    def _delay(self, attempt: int, err: UpstreamError) -> float | None:
        """Seconds to wait before retrying the same target, or None to move on."""
        r = self.config.retry
        if attempt >= r.attempts:
            return None
        backoff = min(r.max_backoff, r.backoff * (2 ** attempt))
        if err.retry_after is not None:
            if err.retry_after > r.max_backoff:
                return None  # the provider asks for longer than we wait: fall back instead
            return max(backoff, err.retry_after)
        return backoff

    def plan(self, req: dict[str, Any], tags: str | None) -> Plan:
        return self.router.plan(Traits.of(req, tags))

    # -- calls -----------------------------------------------------------------------------
    async def _attempt(self, plan: Plan, requested: str, ctx: CallContext, stream: bool,
                       call: Callable[[Target], Awaitable[T]]) -> tuple[Target, T]:
        """``call`` each target in the plan's order, retrying what is worth retrying; every
        failed attempt is a ledger row."""
        last: Exception | None = None
        for target in plan.targets:
            attempt = 0
            while True:
                t0 = time.perf_counter()
                try:
                    return target, await call(target)
                except FlowcError as err:
                    ms = (time.perf_counter() - t0) * 1000
                    self._record(requested, target, None, ok=False, latency_ms=ms, usage=None,
                                 ctx=ctx, rule=plan.rule, stream=stream, error=err)
                    if not isinstance(err, UpstreamError) or not err.retryable:
                        raise  # the request is wrong, or the provider said no for good
                    last = err
                    delay = self._delay(attempt, err)
                    if delay is None:
                        break
                    log.info("retrying %s in %.2fs after %s", target, delay, err.message)
                    await asyncio.sleep(delay)
                    attempt += 1
            log.info("falling back from %s after %s", target, last)
        assert last is not None
        raise last

    async def complete(self, req: dict[str, Any], *, tags: str | None = None,
                       ctx: CallContext = NO_CONTEXT) -> Outcome:
        requested = str(req.get("model", ""))
        plan = self.plan(req, tags)
        t0 = time.perf_counter()

        async def call(target: Target) -> Any:
            nonlocal t0
            t0 = time.perf_counter()
            return await self.providers.complete(target, req)

        target, result = await self._attempt(plan, requested, ctx, False, call)
        ms = (time.perf_counter() - t0) * 1000
        served = result.body.get("model") or target.model
        cost = self._record(requested, target, served, ok=True, latency_ms=ms,
                            usage=result.usage, ctx=ctx, rule=plan.rule, stream=False)
        return Outcome(result.body, target, result.usage, cost, result.upstream_ms, plan.rule)

    async def stream(self, req: dict[str, Any], *, tags: str | None = None,
                     ctx: CallContext = NO_CONTEXT) -> StreamOutcome:
        """Open a stream, retrying and falling back until its first chunk arrives; after
        that, an error ends the stream (its bytes already reached the client)."""
        requested = str(req.get("model", ""))
        plan = self.plan(req, tags)

        async def call(target: Target) -> Any:
            state = StreamState()
            chunks = self.providers.stream(target, req, state)
            try:
                first = await chunks.__anext__()
            except StopAsyncIteration:
                first = None
            return state, chunks, first

        target, (state, chunks, first) = await self._attempt(plan, requested, ctx, True, call)
        return self._stream_outcome(requested, target, plan, state, first, chunks, ctx)

    def _stream_outcome(self, requested: str, target: Target, plan: Plan, state: StreamState,
                        first: dict[str, Any] | None, chunks: AsyncIterator[dict[str, Any]],
                        ctx: CallContext) -> StreamOutcome:
        outcome = StreamOutcome(chunks, target, plan.rule, state)
        served: list[str] = []

        async def replay() -> AsyncIterator[dict[str, Any]]:
            error: Exception | None = None
            try:
                if first is not None:
                    served.append(first.get("model") or target.model)
                    yield first
                async for c in chunks:
                    yield c
            except Exception as exc:  # recorded, then passed on to the HTTP layer
                error = exc
                raise
            finally:
                ms = (time.perf_counter() - state.started) * 1000
                ok = error is None and state.usage is not None
                if error is None and state.usage is None:
                    error = RuntimeError("stream ended before the provider reported usage")
                self._record(requested, target, served[0] if served else None, ok=ok,
                             latency_ms=ms, usage=state.usage, ctx=ctx, rule=plan.rule,
                             stream=True, error=error, ttft_ms=state.first_token_ms)
                await chunks.aclose()  # type: ignore[attr-defined]

        outcome.chunks = replay()
        return outcome

"""Calling a model: routing, retries with backoff, fallbacks, cost, and one ledger row per
attempt. The HTTP gateway and pipeline steps both call models through here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from functools import partial
from typing import Any, NoReturn, TypeVar

from flowc.config import ProjectConfig
from runtime import observe
from runtime.access.budgets import BudgetExceeded
from runtime.access.gate import OPEN, Denied, Gate, Grant, Principal, Unpriced
from runtime.access.limits import RateLimited
from runtime.gateway.responses_store import Conversations, ResponseStore
from runtime.gateway.routing import Plan, Router, Traits
from runtime.ledger.pricing import price
from runtime.ledger.store import CallRecord, Ledger
from runtime.providers import (
    ChatResult,
    Providers,
    RequestError,
    StreamState,
    Target,
    UpstreamError,
    Usage,
)
from runtime.providers.base import estimate_usage

log = logging.getLogger("flowc.gateway")
T = TypeVar("T")
# The ledger's `error` for a call cut off from our side; its error_class is CancelledError.
CANCELLED = ("cancelled before the answer was complete (a step timeout, a failed sibling "
             "step, a client that went away, or shutdown)")


@dataclass(frozen=True)
class CallContext:
    """Who made the call: a pipeline run's step, or a plain gateway request."""

    workflow_name: str | None = None
    run_id: str | None = None
    step_id: str | None = None
    dry_run: bool = False
    # False when the caller retries itself (a pipeline step with `retries:`): the gateway
    # then falls back but does not retry a target, so the two never multiply.
    retries: bool = True
    who: Principal | None = None  # the caller (a virtual key), when the gateway has one
    # An upper bound on the prompt's tokens (the request body's size), for reserving a
    # budget; None: bounded from the request itself.
    prompt_bound: int | None = None
    # Models to try after the plan's own targets (a pipeline step's `fallback_models:`).
    fallbacks: tuple[str, ...] = ()
    # Where a call's last ledger row and metrics go when they may wait until its answer is
    # written (the HTTP front door runs them then, before the request ends: the client
    # is not kept waiting for them); None: at once.
    after: list[Callable[[], None]] | None = None


NO_CONTEXT = CallContext()


class AccessError(RequestError):
    """A call its caller may not make (key, rate limit, budget), in the API's error shape."""

    def __init__(self, message: str, *, status: int, code: str, type: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, status=status, code=code)
        self.type = type or {401: "invalid_request_error", 403: "permission_error",
                             429: "rate_limit_error"}.get(status, "invalid_request_error")
        self.retry_after = retry_after


def access_error(exc: Exception) -> AccessError:
    if isinstance(exc, Denied):
        return AccessError(exc.message, status=exc.status, code=exc.code)
    if isinstance(exc, RateLimited):
        return AccessError(str(exc), status=429, code="rate_limit_exceeded",
                           type="requests", retry_after=exc.retry_after)
    if isinstance(exc, BudgetExceeded):
        return AccessError(str(exc), status=429, code="insufficient_quota",
                           type="insufficient_quota")
    return AccessError(str(exc), status=400, code="model_unpriced")


@dataclass(slots=True)
class Bill:
    """Who a call is charged to: its ledger rows' attribution, and its admission."""

    key_id: str | None = None
    key_name: str | None = None
    team: str | None = None
    tags: str | None = None
    grant: Grant | None = None
    attempt: int = 0  # the call's upstream attempt under way (1, 2, ...), for its trace
    fallback: int = 0  # which of the plan's targets it is at (0: the first)

    def close(self) -> None:
        if self.grant is not None:
            self.grant.close()


def _tags(tags: str | None) -> str | None:
    if not tags:
        return None
    return ",".join(sorted({t.strip() for t in tags.split(",") if t.strip()})) or None

# How one API sends a request to a target, when it is not the chat completions default: a
# same-wire call forwarded verbatim, or one translated for the target's wire. ``Send``
# returns the answer in the client's wire (``ChatResult.body``); ``Open`` yields the stream's
# items in the client's wire, filling the state (usage, served model) as they pass.
Send = Callable[[Target], Awaitable[ChatResult]]
Open = Callable[[Target, StreamState], AsyncIterator[Any]]


@dataclass
class Outcome:
    body: dict[str, Any]
    target: Target
    usage: Usage
    cost: Decimal | None
    upstream_ms: float
    rule: str | None
    attempts: int = 1  # upstream calls made for it (failed attempts included)


@dataclass
class StreamOutcome:
    chunks: AsyncIterator[Any]  # the first chunk already read is replayed
    target: Target
    rule: str | None
    state: StreamState
    # Ends the call if the HTTP layer never read the stream to its end (a client that went
    # away, shutdown): the ledger row is written either way, exactly once.
    close: Callable[[], Awaitable[None]] = field(default=None)  # type: ignore[assignment]


def _served(body: dict[str, Any], target: Target) -> str:
    model = body.get("model")
    return model if isinstance(model, str) and model else target.model


class ModelCaller:
    def __init__(self, config: ProjectConfig, providers: Providers, router: Router,
                 ledger: Ledger | None, gate: Gate | None = None,
                 conversations: Conversations | None = None) -> None:
        self.config = config
        self.providers = providers
        self.router = router
        self.ledger = ledger
        self.gate = gate
        # Where /v1/responses keeps the responses OpenAI does not (chosen at start-up).
        self.conversations = conversations or ResponseStore()
        observe.METRICS.configure(config)  # the model names its calls are counted under

    # -- bookkeeping -----------------------------------------------------------------------
    def _record(self, requested: str, target: Target | None, served: str | None, *,
                status: str, latency_ms: float, usage: Usage | None, ctx: CallContext,
                rule: str | None, stream: bool, error: BaseException | None = None,
                ttft_ms: float | None = None, bill: Bill | None = None, req: Any = None,
                answer: Any = None, finish: str | None = None, last: bool = False
                ) -> Decimal | None:
        """One ledger row. ``status``: ok | error | cancelled. A cost is never $0 for want
        of a count: without ``usage`` it is NULL; an estimated usage is priced and marked.
        ``last``: the call's bill is closed right after (its grant settles in one go)."""
        ok = status == "ok"
        cost, source = (None, None)
        if usage is not None and target is not None:
            cost, source = price(target.provider, target.model, usage, self.config.prices)
        if ok and target is not None:
            self.router.latency.add(target, latency_ms)
        if error is not None:
            error.recorded = True  # type: ignore[attr-defined]  # see `refused`
        bill = bill or Bill()
        if bill.grant is not None:  # at once: a budget's counters are never behind
            if last:
                bill.grant.settle(cost, usage)
            else:
                bill.grant.charge(cost, usage)
        book = partial(self._book, requested, target, served, status, latency_ms, usage, ctx,
                       rule, stream, error, ttft_ms, bill, req, answer, finish, cost, source)
        # A whole answer's last row waits until the answer is written (a stream's is at
        # its end anyway; a traced call's span is timed where the call is).
        if last and not stream and ctx.after is not None and observe.tracing.active() is None:
            ctx.after.append(book)
        else:
            book()
        return cost

    def _book(self, requested: str, target: Target | None, served: str | None, status: str,
              latency_ms: float, usage: Usage | None, ctx: CallContext, rule: str | None,
              stream: bool, error: BaseException | None, ttft_ms: float | None, bill: Bill,
              req: Any, answer: Any, finish: str | None, cost: Decimal | None,
              source: str | None) -> None:
        """`_record`'s ledger row and metrics."""
        ok = status == "ok"
        if self.ledger is not None:
            u = usage or Usage()
            self.ledger.record(CallRecord(
                model=requested, provider=target.provider if target else None,
                served_model=served or (target.model if target else None), success=ok,
                status=status, usage_estimated=u.estimated,
                latency_ms=latency_ms, prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens, cached_tokens=u.cached_tokens,
                cache_write_tokens=u.cache_write_tokens, reasoning_tokens=u.reasoning_tokens,
                cache_write_1h_tokens=u.cache_write_1h_tokens,
                cost_usd=cost, price_source=source, ttft_ms=ttft_ms,
                error=self._describe(error) if error is not None else None,
                error_class=type(error).__name__ if error is not None else None, route=rule,
                stream=stream, dry_run=ctx.dry_run, workflow_name=ctx.workflow_name,
                run_id=ctx.run_id, step_id=ctx.step_id, key_id=bill.key_id,
                key_name=bill.key_name, team=bill.team, tags=bill.tags))
        observe.call(self._describe, requested, target, served, status=status,
                     latency_ms=latency_ms, usage=usage, cost=cost, ttft_ms=ttft_ms,
                     error=error, stream=stream, ctx=ctx, bill=bill, req=req, answer=answer,
                     finish=finish)

    def refused(self, req: Any, error: BaseException, *, stream: bool = False,
                ctx: CallContext = NO_CONTEXT, tags: str | None = None) -> None:
        """A request refused before any provider answered it (not JSON, a wrong field, an
        unknown model): a row of its own, status `refused`, so every request that reached
        flowc is in the ledger. An error already recorded (a provider's answer) is not
        recorded twice."""
        if getattr(error, "recorded", False):
            return
        model = req.get("model") if isinstance(req, dict) else None
        self._record(model if isinstance(model, str) else "", None, None, status="refused",
                     latency_ms=0.0, usage=None, ctx=ctx, rule=None, stream=stream,
                     error=error, bill=self._bill(ctx, tags), req=req)

    def record_cached(self, model: str, provider: str | None, served: str | None,
                      saved: Decimal | None, latency_ms: float, ctx: CallContext) -> None:
        """A pipeline step's cached result reused instead of a call (`cache:`): a row of
        its own, $0, marked cached, with what the call had cost as its saving."""
        if self.ledger is None:
            return
        bill = self._bill(ctx, None)
        self.ledger.record(CallRecord(
            model=model, provider=provider, served_model=served, success=True, status="ok",
            latency_ms=latency_ms, cost_usd=Decimal(0), price_source="cache", cached=True,
            saved_usd=saved, dry_run=ctx.dry_run, workflow_name=ctx.workflow_name,
            run_id=ctx.run_id, step_id=ctx.step_id, key_id=bill.key_id,
            key_name=bill.key_name, team=bill.team, tags=bill.tags))

    def _bill(self, ctx: CallContext, tags: str | None) -> Bill:
        key = ctx.who.key if ctx.who is not None else None
        if key is None:
            return Bill(tags=_tags(tags))
        assert self.gate is not None
        return Bill(key.id, key.name, key.team,
                    self.gate.row_tags(ctx.who, tags) if tags or key.tags else None)

    async def _admit(self, req: dict[str, Any], plan: Plan, tags: str | None,
                     ctx: CallContext, stream: bool) -> Bill:
        """The call's bill, with its budgets reserved and rate limits taken; a call its
        caller may not make is refused here, and recorded."""
        bill = self._bill(ctx, tags)
        gate = self.gate
        if gate is None:
            return bill
        call = (ctx.who or OPEN, str(req.get("model", "")), plan.targets, req,
                ctx.prompt_bound, bill.tags, ctx.workflow_name)
        try:
            bill.grant = gate.admit(*call) if gate.at_once else await gate.admit_wait(*call)
        except (Denied, RateLimited, BudgetExceeded, Unpriced) as exc:
            self._refuse(req, plan, ctx, stream, bill, exc)
        return bill

    def permit(self, req: dict[str, Any], ctx: CallContext) -> None:
        """Before a pipeline step's cached result is reused instead of this call: refused,
        and recorded, exactly as the call would be if ctx's key may not make it (read-only,
        outside its models). No rate limit or budget is taken: no call is made."""
        plan = self._plan_or_refuse(req, None, ctx, False)
        if self.gate is None:
            return
        try:
            self.gate.permit(ctx.who or OPEN, str(req.get("model", "")), plan.targets)
        except Denied as exc:
            self._refuse(req, plan, ctx, False, self._bill(ctx, None), exc)

    def _refuse(self, req: dict[str, Any], plan: Plan, ctx: CallContext, stream: bool,
                bill: Bill, exc: Exception) -> NoReturn:
        """A call its caller may not make: a `refused` row on its key, and its error."""
        err = access_error(exc)
        self._record(str(req.get("model", "")), None, None, status="refused",
                     latency_ms=0.0, usage=None, ctx=ctx, rule=plan.rule, stream=stream,
                     error=err, bill=bill, req=req)
        raise err from None

    def _describe(self, error: BaseException) -> str:
        """An error's text for the ledger and the log, with every provider key cut out
        (a failure path: the adapters already redact, this is the last line)."""
        return self.providers.redact_text(str(getattr(error, "message", None) or error))

    def _delay(self, attempt: int, err: UpstreamError, ctx: CallContext) -> float | None:
        """Seconds to wait before retrying the same target, or None to move on."""
        r = self.config.retry
        if attempt >= r.attempts or not ctx.retries:
            return None
        backoff = min(r.max_backoff, r.backoff * (2 ** attempt))
        if err.retry_after is not None:
            if err.retry_after > r.max_backoff:
                return None  # the provider asks for longer than we wait: fall back instead
            return max(backoff, err.retry_after)
        return backoff

    def plan(self, req: dict[str, Any], tags: str | None,
             fallbacks: tuple[str, ...] = ()) -> Plan:
        plan = self.router.plan(Traits.of(req, tags))
        return self.router.with_fallbacks(plan, fallbacks) if fallbacks else plan

    def _plan_or_refuse(self, req: dict[str, Any], tags: str | None, ctx: CallContext,
                        stream: bool) -> Plan:
        try:
            return self.plan(req, tags, ctx.fallbacks)
        except Exception as err:  # an unknown model, no route: refused, and on the books
            self.refused(req, err, stream=stream, ctx=ctx, tags=tags)
            raise

    # -- calls -----------------------------------------------------------------------------
    async def _attempt(self, plan: Plan, requested: str, req: dict[str, Any], ctx: CallContext,
                       stream: bool, call: Callable[[Target], Awaitable[T]], bill: Bill
                       ) -> tuple[Target, T, int]:
        """``call`` each target in the plan's order, retrying what is worth retrying; every
        attempt that does not return is a ledger row (error, or cancelled). Returns the
        target that answered, its answer and the number of calls made; a raised error
        carries that number as ``attempts``."""
        last: UpstreamError | None = None
        made = 0
        for i, target in enumerate(plan.targets):
            attempt = 0
            while True:
                t0 = time.perf_counter()
                made += 1
                bill.attempt, bill.fallback = made, i
                try:
                    return target, await call(target), made
                except asyncio.CancelledError:
                    # Cut off from our side while the provider works on it: the prompt
                    # reached it, what it answered is unknown.
                    self._record(requested, target, None, status="cancelled",
                                 latency_ms=(time.perf_counter() - t0) * 1000,
                                 usage=estimate_usage(req, 0), ctx=ctx, rule=plan.rule,
                                 stream=stream, error=asyncio.CancelledError(CANCELLED),
                                 bill=bill, req=req)
                    raise
                except Exception as err:
                    ms = (time.perf_counter() - t0) * 1000
                    # Refused on our side (a field this target's wire cannot carry) before
                    # the provider heard of it; otherwise the provider failed.
                    status = "refused" if isinstance(err, RequestError) else "error"
                    self._record(requested, target, None, status=status, latency_ms=ms,
                                 usage=None, ctx=ctx, rule=plan.rule, stream=stream, error=err,
                                 bill=bill, req=req)
                    if not isinstance(err, UpstreamError) or not err.retryable:
                        err.attempts = made  # type: ignore[attr-defined]
                        raise  # the request is wrong, or the provider said no for good
                    last = err
                    delay = self._delay(attempt, err, ctx)
                    if delay is None:
                        break
                    observe.retried(target)
                    log.info("retrying %s in %.2fs after %s", target, delay,
                             self._describe(err))
                    await asyncio.sleep(delay)
                    attempt += 1
            if i + 1 < len(plan.targets):
                observe.fell_back(target)
                log.warning("%s failed (%s): falling back to %s", target,
                            self._describe(last), plan.targets[i + 1])
            else:
                log.warning("%s failed (%s): giving up, no fallback left", target,
                            self._describe(last))
        assert last is not None
        last.attempts = made  # type: ignore[attr-defined]
        raise last

    async def complete(self, req: dict[str, Any], *, tags: str | None = None,
                       ctx: CallContext = NO_CONTEXT, send: Send | None = None) -> Outcome:
        """``req`` in any wire served (it is routed and, when a call is cut off, estimated
        from); ``send`` calls a target, by default with ``req`` as a chat completion."""
        requested = str(req.get("model", ""))
        plan = self._plan_or_refuse(req, tags, ctx, False)
        t0 = time.perf_counter()

        async def call(target: Target) -> Any:
            nonlocal t0
            t0 = time.perf_counter()
            if send is not None:
                return await send(target)
            return await self.providers.complete(target, req)

        bill = await self._admit(req, plan, tags, ctx, False)
        try:
            target, result, made = await self._attempt(plan, requested, req, ctx, False, call,
                                                       bill)
            ms = (time.perf_counter() - t0) * 1000
            cost = self._record(requested, target, _served(result.body, target), status="ok",
                                latency_ms=ms, usage=result.usage, ctx=ctx, rule=plan.rule,
                                stream=False, bill=bill, req=req, answer=result.body,
                                last=True)
        finally:
            bill.close()
        return Outcome(result.body, target, result.usage, cost, result.upstream_ms, plan.rule,
                       made)

    async def stream(self, req: dict[str, Any], *, tags: str | None = None,
                     ctx: CallContext = NO_CONTEXT, open: Open | None = None) -> StreamOutcome:
        """Open a stream, retrying and falling back until its first chunk arrives; after
        that, an error ends the stream (its bytes already reached the client). ``open``
        streams from a target, by default ``req`` as a chat completion."""
        requested = str(req.get("model", ""))
        plan = self._plan_or_refuse(req, tags, ctx, True)

        async def call(target: Target) -> Any:
            state = StreamState()
            chunks = (open(target, state) if open is not None
                      else self.providers.stream(target, req, state))
            try:
                first = await chunks.__anext__()
            except StopAsyncIteration:  # a 200 with no events is no answer
                raise UpstreamError(target.provider, 502,
                                    "the stream ended before any event") from None
            return state, chunks, first

        bill = await self._admit(req, plan, tags, ctx, True)
        try:
            target, (state, chunks, first), _ = await self._attempt(plan, requested, req, ctx,
                                                                    True, call, bill)
        except BaseException:
            bill.close()
            raise
        return self._stream_outcome(requested, req, target, plan, state, first, chunks, ctx,
                                    bill)

    def _stream_outcome(self, requested: str, req: dict[str, Any], target: Target, plan: Plan,
                        state: StreamState, first: Any, chunks: AsyncIterator[Any],
                        ctx: CallContext, bill: Bill) -> StreamOutcome:
        outcome = StreamOutcome(chunks, target, plan.rule, state)
        recorded = False

        def record(status: str, error: BaseException | None) -> None:
            """The stream's row: the provider's usage when it ended normally with one;
            otherwise what it reported so far and an estimate of the rest, marked."""
            nonlocal recorded
            if recorded:
                return
            recorded = True
            usage = state.usage
            if usage is None or status != "ok":
                usage = estimate_usage(req, state.out_chars, usage or state.partial)
            served = state.model or (_served(first, target) if isinstance(first, dict)
                                     else target.model)
            self._record(requested, target, served, status=status,
                         latency_ms=(time.perf_counter() - state.started) * 1000,
                         usage=usage, ctx=ctx, rule=plan.rule, stream=True, error=error,
                         ttft_ms=state.first_token_ms, bill=bill, req=req,
                         finish=state.finish_reason, last=True)
            bill.close()

        async def replay() -> AsyncIterator[Any]:
            status, error = "ok", None
            try:
                yield first
                async for c in chunks:
                    yield c
            except (asyncio.CancelledError, GeneratorExit):
                status, error = "cancelled", asyncio.CancelledError(CANCELLED)
                raise
            except Exception as exc:  # recorded, then passed on to the HTTP layer
                status, error = "error", exc
                raise
            finally:
                record(status, error)
                await chunks.aclose()  # type: ignore[attr-defined]

        replayed = replay()

        async def close() -> None:
            await replayed.aclose()  # a replay cut short records itself as cancelled
            record("cancelled", asyncio.CancelledError(CANCELLED))  # one never started
            await chunks.aclose()  # type: ignore[attr-defined]

        outcome.chunks = replayed
        outcome.close = close
        return outcome

"""Seeing inside flowc: Prometheus metrics (`GET /metrics`, always counted) and OpenTelemetry
traces (only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set). docs/observability.md.

The rest of flowc calls the hooks below, one line each where a model call is recorded, a
model API request starts and ends, a pipeline run or step runs and an MCP tool is called.
With tracing off a hook costs a dict lookup or two and a few additions; nothing from
`opentelemetry` is imported.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

from runtime.observe import tracing
from runtime.observe.metrics import METRICS, Metrics

__all__ = ["METRICS", "Metrics", "call", "fell_back", "model_api", "pipeline_run",
           "request_ended", "retried", "step", "tool_call", "tracing"]

# The GenAI operation of each model API (the default, `chat`, is a pipeline step's).
OPERATIONS = {"/v1/chat/completions": "chat", "/v1/responses": "chat",
              "/v1/messages": "chat", "/v1/messages/count_tokens": "count_tokens",
              "/v1/embeddings": "embeddings"}
_operation: contextvars.ContextVar[str] = contextvars.ContextVar("flowc_operation",
                                                                  default="chat")


def model_api(path: str) -> None:
    """A model API request starts (its handler is about to run)."""
    METRICS.request_started(path)
    _operation.set(OPERATIONS.get(path, "chat"))


def request_ended(path: str, response: Any) -> None:
    """It ended (answered, its stream sent, or failed): ``response`` is None when the
    handler raised."""
    METRICS.request_ended(path, response.raw_headers if response is not None else ())


def call(describe: Callable[[BaseException], str], requested: str, target: Any,
         served: str | None, *, status: str, latency_ms: float, usage: Any,
         cost: Decimal | None, ttft_ms: float | None, error: BaseException | None,
         stream: bool, ctx: Any, bill: Any, req: Any = None, answer: Any = None,
         finish: str | None = None) -> None:
    """One model call, as its ledger row is written (runtime/gateway/calls.py)."""
    operation = _operation.get()
    provider = target.provider if target is not None else None
    model = target.model if target is not None else requested
    METRICS.call(operation, provider, model, status, stream, latency_ms, usage, cost,
                 ttft_ms, error)
    traced = tracing.active()
    if traced is not None:
        traced.call(operation=operation, requested=requested, provider=provider,
                    model=target.model if target is not None else None, served=served,
                    status=status, latency_ms=latency_ms, usage=usage, cost=cost,
                    ttft_ms=ttft_ms, error=error,
                    error_text=describe(error) if error is not None else None, stream=stream,
                    ctx=ctx, bill=bill, req=req, answer=answer, finish=finish)


def retried(target: Any) -> None:
    METRICS.retry(target.provider, target.model)


def fell_back(target: Any) -> None:
    """``target`` failed and the next one is tried."""
    METRICS.fallback(target.provider, target.model)


@contextmanager
def _span(opened: Any) -> Iterator[Callable[[Any], None] | None]:
    """``opened``'s span (a context manager yielding its result setter), or None."""
    if opened is None:
        yield None
    else:
        with opened as done:
            yield done


@contextmanager
def pipeline_run(workflow: str, run_id: str, dry_run: bool,
                 steps: Mapping[str, Any]) -> Iterator[Callable[[Any], Any]]:
    """Around a pipeline run: ``seen(result)`` gives its result (and returns it); a run
    that ends otherwise (cancelled, or an exception) counts from its steps as they stand."""
    t0 = time.perf_counter()
    traced = tracing.active()
    ended: list[Any] = []
    status = "cancelled"
    try:
        with _span(traced and traced.run(workflow, run_id, dry_run)) as span_done:
            def seen(result: Any) -> Any:
                ended.append(result)
                if span_done is not None:
                    span_done(result)
                return result

            yield seen
    except Exception:
        status = "failed"
        raise
    finally:
        if ended:
            r = ended[0]
            METRICS.run(workflow, r.status, time.perf_counter() - t0, r.total_cost,
                        (s.status for s in r.steps.values()), dry_run)
        else:
            METRICS.run(workflow, status, time.perf_counter() - t0, None,
                        (s.status for s in steps.values()), dry_run)


def step(coro: Coroutine[Any, Any, None], step_id: str, result: Any
         ) -> Coroutine[Any, Any, None]:
    """A step's task: itself, or wrapped in its span when tracing is on."""
    traced = tracing.active()
    return coro if traced is None else traced.step(coro, step_id, result)


@contextmanager
def tool_call(server: str, tool: str, args: Any) -> Iterator[Callable[[Any], Any]]:
    """Around one MCP tool call: ``seen(result)`` gives its result (and returns it)."""
    t0 = time.perf_counter()
    outcome = "failed"
    traced = tracing.active()
    try:
        with _span(traced and traced.tool(server, tool, args)) as span_done:
            def seen(res: Any) -> Any:
                nonlocal outcome
                outcome = "error" if res.is_error else "ok"
                if span_done is not None:
                    span_done(res)
                return res

            yield seen
    finally:
        METRICS.tool(server, tool, outcome, time.perf_counter() - t0)

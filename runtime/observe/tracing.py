"""OpenTelemetry traces, exported over OTLP/HTTP when the standard environment asks for it.

Only `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) turns tracing
on; without it `active()` is None, every hook returns at once and nothing from
`opentelemetry` is imported. The SDK reads the rest of the standard variables itself
(headers, timeout, compression, sampler, batch sizes, service name and resource).

The spans (GenAI semantic conventions, docs/observability.md):

- a gateway request: a SERVER span `chat gpt-4o-mini` (its GenAI attributes those of the
  attempt that answered), continuing the client's `traceparent`;
- a pipeline run: `invoke_workflow NAME`, each step `step ID` under it;
- under either, one CLIENT span per attempt at a model (`chat MODEL`: retries and
  fallbacks are siblings, `flowc.attempt` counts them), made from the ledger row's facts
  when it is written, so the request path never holds a span open for it; and one
  `execute_tool TOOL` span per MCP tool call.

Spans are batched and sent by the SDK's BatchSpanProcessor on its own thread, off the event
loop. Prompt and completion content goes on spans only with
`OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("flowc.observe")
ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
CAPTURE_VAR = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
MAX_CONTENT = 16_384  # characters of captured content per attribute

_active: Tracing | None = None
_checked = False


def wanted(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for traces: an OTLP endpoint, and the SDK not disabled
    nor its traces exporter set to `none`."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return any(env.get(v, "").strip() for v in ENDPOINT_VARS)


def active() -> Tracing | None:
    """The process's tracing, set up on first use when the environment asks for it."""
    global _active, _checked
    if _checked:
        return _active
    _checked = True
    if wanted():
        try:
            _active = Tracing()
        except Exception as exc:  # a bad variable must not stop the server
            log.error("tracing is off: could not set up the OTLP exporter: %s", exc)
    return _active


def shutdown() -> None:
    """Send what is batched (the SDK also does this at exit)."""
    if _active is not None:
        _active.provider.shutdown()


# What a gateway request's SERVER span repeats of its answering attempt (each attribute is
# copied and encoded again: the rest is on the attempt's span, one level down).
_ON_SERVER = ("gen_ai.provider.name", "gen_ai.request.model", "gen_ai.response.model",
              "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "flowc.cost_usd")


class _DropsNow(logging.Filter):
    """The SDK logs each span it drops when its queue is full (an endpoint that is down or
    slow): one line a minute instead, with the count, so a flood costs no log I/O."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0
        self.next = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Queue full"):
            return True
        self.dropped += 1
        now = time.monotonic()
        if now < self.next:
            return False
        self.next = now + 60
        record.msg, record.args = ("tracing: the span queue is full (the OTLP endpoint is "
                                   "down or slow): %d spans dropped so far"), (self.dropped,)
        return True


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:MAX_CONTENT]


def _parts(content: Any) -> list[dict[str, Any]]:
    """Message content as GenAI convention parts (text; anything else by its type)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    parts: list[dict[str, Any]] = []
    for part in content if isinstance(content, list) else [content]:
        if isinstance(part, str):
            parts.append({"type": "text", "content": part})
        elif isinstance(part, dict):
            text = part.get("text") or part.get("thinking")
            kind = str(part.get("type", "text"))
            if kind == "tool_use":
                parts.append({"type": "tool_call", "id": part.get("id"),
                              "name": part.get("name"), "arguments": part.get("input")})
            elif isinstance(text, str):
                parts.append({"type": "text", "content": text})
            else:
                parts.append({"type": kind})
    return parts


def _message(msg: Any, role: str = "user") -> dict[str, Any]:
    if not isinstance(msg, dict):
        return {"role": role, "parts": _parts(msg)}
    parts = _parts(msg.get("content"))
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") or {}
        parts.append({"type": "tool_call", "id": call.get("id"), "name": fn.get("name"),
                      "arguments": fn.get("arguments")})
    out: dict[str, Any] = {"role": msg.get("role") or role, "parts": parts}
    return out


def input_messages(req: Any) -> list[dict[str, Any]]:
    """A request's messages in any wire served, as the convention's input messages."""
    if not isinstance(req, dict):
        return []
    items = req.get("messages")
    if items is None:
        items = req.get("input")
    if isinstance(items, str):
        return [{"role": "user", "parts": _parts(items)}]
    return [_message(m) for m in items] if isinstance(items, list) else []


def output_messages(answer: Any) -> list[dict[str, Any]]:
    """An answer (chat completion, Anthropic message, response) as output messages."""
    if not isinstance(answer, dict):
        return []
    if isinstance(answer.get("choices"), list):
        return [{**_message(c.get("message") or {}, "assistant"),
                 "finish_reason": c.get("finish_reason")} for c in answer["choices"]
                if isinstance(c, dict)]
    if isinstance(answer.get("content"), list):
        return [{"role": "assistant", "parts": _parts(answer["content"]),
                 "finish_reason": answer.get("stop_reason")}]
    if isinstance(answer.get("output"), list):
        return [_message(item, "assistant") for item in answer["output"]
                if isinstance(item, dict) and item.get("type") == "message"]
    return []


def finish_reasons(answer: Any, finish: str | None) -> list[str]:
    if finish:
        return [finish]
    if not isinstance(answer, dict):
        return []
    if isinstance(answer.get("choices"), list):
        return [str(c["finish_reason"]) for c in answer["choices"]
                if isinstance(c, dict) and c.get("finish_reason")]
    reason = answer.get("stop_reason") or answer.get("done_reason")
    if reason:
        return [str(reason)]
    if answer.get("object") == "response" and answer.get("status"):
        return [str(answer["status"])]
    return []


class Tracing:
    """The tracer, its exporter and the span helpers flowc's hooks call."""

    def __init__(self) -> None:
        from opentelemetry import context, propagate, trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from flowc import __version__

        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or \
            os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
        if protocol != "http/protobuf":
            log.warning("flowc exports traces as OTLP http/protobuf, not %s "
                        "(OTEL_EXPORTER_OTLP_PROTOCOL)", protocol)
        named = os.environ.get("OTEL_SERVICE_NAME") or \
            "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
        attrs = {"service.version": __version__, **({} if named else {"service.name": "flowc"})}
        self.provider = TracerProvider(resource=Resource.create(attrs))
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        logging.getLogger("opentelemetry.sdk._shared_internal").addFilter(_DropsNow())
        self.tracer = self.provider.get_tracer("flowc", __version__)
        self.trace, self.context, self.propagate = trace, context, propagate
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self.SpanKind, self.Status, self.StatusCode = SpanKind, Status, StatusCode
        self.capture = os.environ.get(CAPTURE_VAR, "").strip().lower() == "true"
        # The SERVER span of the gateway request being answered, if any.
        self.request: contextvars.ContextVar[Any] = contextvars.ContextVar(
            "flowc_request_span", default=None)
        log.info("tracing: spans go to %s over OTLP/HTTP",
                 next(os.environ[v] for v in ENDPOINT_VARS if os.environ.get(v, "").strip()))

    # -- a request to the server -----------------------------------------------------------
    async def serve(self, inner: Callable[[Any, Any, Any], Awaitable[None]], scope: Any,
                    receive: Any, send: Any, operation: str | None) -> None:
        """Run ``inner`` in the client's trace (its `traceparent`, through the configured
        propagators); a model API request (``operation`` given) gets a SERVER span."""
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                   if k in (b"traceparent", b"tracestate", b"baggage")}
        parent = self.propagate.extract(carrier) if carrier else None
        if operation is None:
            token = self.context.attach(parent) if parent is not None else None
            try:
                await inner(scope, receive, send)
            finally:
                if token is not None:
                    self.context.detach(token)
            return
        path = scope["path"]
        span = self.tracer.start_span(
            f"{operation} {path}", context=parent, kind=self.SpanKind.SERVER,
            attributes={"gen_ai.operation.name": operation, "http.request.method": "POST",
                        "url.path": path})
        status = 0

        async def seen_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        token = self.context.attach(self.trace.set_span_in_context(span, parent))
        mark = self.request.set(span)
        try:
            await inner(scope, receive, seen_send)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(self.Status(self.StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            self.request.reset(mark)
            self.context.detach(token)
            if status:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(self.Status(self.StatusCode.ERROR))
            span.end()

    # -- one model call (a ledger row) -----------------------------------------------------
    def call(self, *, operation: str, requested: str, provider: str | None,
             model: str | None, served: str | None, status: str, latency_ms: float,
             usage: Any, cost: Any, ttft_ms: float | None, error: BaseException | None,
             error_text: str | None, stream: bool, ctx: Any, bill: Any, req: Any,
             answer: Any, finish: str | None) -> None:
        end = time.time_ns()
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": operation, "gen_ai.request.model": model or requested,
            "flowc.requested_model": requested, "flowc.status": status,
            "gen_ai.request.stream": stream}
        if provider is not None:
            attrs["gen_ai.provider.name"] = attrs["gen_ai.system"] = provider
        if served:
            attrs["gen_ai.response.model"] = served
        if usage is not None:
            attrs["gen_ai.usage.input_tokens"] = usage.prompt_tokens
            attrs["gen_ai.usage.output_tokens"] = usage.completion_tokens
            if usage.cached_tokens:
                attrs["gen_ai.usage.cache_read.input_tokens"] = usage.cached_tokens
            if usage.cache_write_tokens:
                attrs["gen_ai.usage.cache_creation.input_tokens"] = usage.cache_write_tokens
            if usage.reasoning_tokens:
                attrs["gen_ai.usage.reasoning.output_tokens"] = usage.reasoning_tokens
            if usage.estimated:
                attrs["flowc.usage_estimated"] = True
        if cost is not None:
            attrs["flowc.cost_usd"] = float(cost)
        if ttft_ms is not None:
            attrs["gen_ai.response.time_to_first_chunk"] = ttft_ms / 1000
        reasons = finish_reasons(answer, finish) if status == "ok" else []
        if reasons:
            attrs["gen_ai.response.finish_reasons"] = reasons
        if isinstance(answer, dict) and isinstance(answer.get("id"), str):
            attrs["gen_ai.response.id"] = answer["id"]
        attempt = getattr(bill, "attempt", 0)
        if attempt:
            attrs["flowc.attempt"] = attempt
        if getattr(bill, "fallback", 0):
            attrs["flowc.fallback"] = bill.fallback
        if ctx is not None and ctx.step_id is not None:
            attrs["flowc.step.id"] = ctx.step_id
        if bill is not None and bill.key_name:
            attrs["flowc.key.name"] = bill.key_name
            if bill.team:
                attrs["flowc.team"] = bill.team
        if error is not None:
            attrs["error.type"] = type(error).__name__
        if self.capture:
            inputs = input_messages(req)
            if inputs:
                attrs["gen_ai.input.messages"] = _text(inputs)
            outputs = output_messages(answer) if status == "ok" else []
            if outputs:
                attrs["gen_ai.output.messages"] = _text(outputs)
        span = self.tracer.start_span(f"{operation} {model or requested}",
                                      kind=self.SpanKind.CLIENT, attributes=attrs,
                                      start_time=end - int(latency_ms * 1e6))
        if error is not None:
            span.set_status(self.Status(self.StatusCode.ERROR, error_text))
        span.end(end_time=end)
        server = self.request.get()
        if server is not None:  # the gateway request takes on the answering call's names
            server.update_name(f"{operation} {model or requested}")
            server.set_attributes({k: attrs[k] for k in _ON_SERVER if k in attrs})
            if error is not None and status != "ok":
                server.set_attribute("error.type", type(error).__name__)

    # -- pipelines and tools ---------------------------------------------------------------
    @contextmanager
    def run(self, workflow: str, run_id: str, dry_run: bool) -> Iterator[Callable[[Any], None]]:
        """A pipeline run's root span (a child of the caller's trace, if it sent one),
        current while its steps start so that theirs are its children."""
        span = self.tracer.start_span(f"invoke_workflow {workflow}", attributes={
            "gen_ai.operation.name": "invoke_workflow", "gen_ai.workflow.name": workflow,
            "flowc.run_id": run_id, "flowc.dry_run": dry_run})
        token = self.context.attach(self.trace.set_span_in_context(span))

        def done(result: Any) -> None:
            cost = result.total_cost
            span.set_attributes({"flowc.status": result.status,
                                 "flowc.tokens": result.total_tokens,
                                 **({"flowc.cost_usd": float(cost)} if cost is not None
                                    else {})})
            if result.status != "succeeded":
                message = (result.error or {}).get("message") if result.error else None
                span.set_status(self.Status(self.StatusCode.ERROR, message or result.status))

        try:
            yield done
        except BaseException as exc:
            span.set_attribute("flowc.status", "cancelled")
            span.set_status(self.Status(self.StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            self.context.detach(token)
            span.end()

    async def step(self, coro: Coroutine[Any, Any, None], step_id: str, result: Any) -> None:
        """One step's span around its task; its model and tool calls are its children."""
        span = self.tracer.start_span(f"step {step_id}", attributes={"flowc.step.id": step_id})
        token = self.context.attach(self.trace.set_span_in_context(span))
        try:
            await coro
        finally:
            self.context.detach(token)
            attrs: dict[str, Any] = {"flowc.step.status": result.status,
                                     "flowc.attempts": result.attempts,
                                     "flowc.tokens": result.tokens}
            if result.cost is not None:
                attrs["flowc.cost_usd"] = float(result.cost)
            if result.skip_reason:
                attrs["flowc.step.skip_reason"] = result.skip_reason
            span.set_attributes(attrs)
            if result.status in ("failed", "cancelled"):
                span.set_status(self.Status(self.StatusCode.ERROR,
                                            result.error or result.status))
            span.end()

    @contextmanager
    def tool(self, server: str, tool: str, args: Any) -> Iterator[Callable[[Any], None]]:
        attrs: dict[str, Any] = {"gen_ai.operation.name": "execute_tool",
                                 "gen_ai.tool.name": tool, "gen_ai.tool.type": "extension",
                                 "mcp.method.name": "tools/call", "flowc.mcp.server": server}
        if self.capture:
            attrs["gen_ai.tool.call.arguments"] = _text(args)
        span = self.tracer.start_span(f"execute_tool {tool}", kind=self.SpanKind.CLIENT,
                                      attributes=attrs)

        def done(res: Any) -> None:
            if res.is_error:
                span.set_attribute("error.type", "tool_error")
                span.set_status(self.Status(self.StatusCode.ERROR, res.text[:500]))
            if self.capture:
                span.set_attribute("gen_ai.tool.call.result", _text(
                    res.structured if res.structured is not None else res.text))

        try:
            yield done
        except BaseException as exc:
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(self.Status(self.StatusCode.ERROR, str(exc)[:500]))
            raise
        finally:
            span.end()

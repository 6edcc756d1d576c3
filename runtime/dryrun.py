"""`--dry-run`: deterministic stand-ins for model and tool calls, so a team can test a
pipeline's wiring in CI without spending. Every result says it is a dry run; ledger rows
carry `dry_run = true` and cost $0.

Tokens are estimated as providers bill text, at about four characters a token (the exact
tokenizers are not bundled: they download their vocabularies at run time).
"""

from __future__ import annotations

import json
import math
import time
from decimal import Decimal
from typing import Any

from runtime.executor import ToolResult
from runtime.gateway.calls import NO_CONTEXT, CallContext, Outcome
from runtime.ledger.store import CallRecord, Ledger
from runtime.providers import Target, Usage

MARK = "[dry-run]"


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4)) if text else 0


def sample(schema: Any) -> Any:
    """A deterministic instance of a JSON Schema (first enum value, zeros, empty strings)."""
    if not isinstance(schema, dict):
        return None
    if schema.get("enum"):
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "object" or "properties" in schema:
        return {k: sample(v) for k, v in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [sample(schema.get("items"))] * int(schema.get("minItems") or 0)
    if kind in ("integer", "number"):  # zero, moved into the schema's bounds
        return _bounded(schema, integer=kind == "integer")
    if kind == "string":  # the marker, padded to the schema's minimum length
        return MARK.ljust(int(schema.get("minLength") or 0), "-")
    return {"boolean": False}.get(kind or "")


def _bounded(schema: dict[str, Any], *, integer: bool) -> int | float:
    value: float = 0
    low, high = schema.get("minimum"), schema.get("maximum")
    low_x, high_x = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if isinstance(low, int | float) and value < low:
        value = math.ceil(low) if integer else low
    if isinstance(low_x, int | float) and value <= low_x:
        value = math.floor(low_x) + 1
    if isinstance(high, int | float) and value > high:
        value = math.floor(high) if integer else high
    if isinstance(high_x, int | float) and value >= high_x:
        value = math.ceil(high_x) - 1
    return int(value) if integer else value


class DryRunModels:
    def __init__(self, ledger: Ledger | None = None) -> None:
        self.ledger = ledger

    async def complete(self, req: dict[str, Any], *, tags: str | None = None,
                       ctx: CallContext = NO_CONTEXT) -> Outcome:
        t0 = time.perf_counter()
        model = str(req.get("model"))
        prompt = "\n".join(str(m.get("content") or "") for m in req.get("messages") or ())
        rf = req.get("response_format") or {}
        if rf.get("type") == "json_schema":
            content = json.dumps(sample((rf.get("json_schema") or {}).get("schema")))
        elif rf.get("type") == "json_object":
            content = json.dumps({"dry_run": True})
        else:
            last = (req.get("messages") or [{}])[-1].get("content") or ""
            content = f"{MARK} {model}: {last}"
        usage = Usage(prompt_tokens=estimate_tokens(prompt),
                      completion_tokens=estimate_tokens(content))
        body = {"id": "chatcmpl-dry-run", "object": "chat.completion",
                "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content}}],
                "usage": usage.to_openai()}
        if self.ledger is not None:
            self.ledger.record(CallRecord(
                model=model, provider="dry-run", served_model=model, success=True,
                latency_ms=(time.perf_counter() - t0) * 1000,
                prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                cost_usd=Decimal(0), price_source="dry-run", dry_run=True,
                workflow_name=ctx.workflow_name, run_id=ctx.run_id, step_id=ctx.step_id))
        return Outcome(body, Target("dry-run", model), usage, Decimal(0), 0.0, None)


class DryRunTools:
    """Tool calls answered from the tool's output schema when known, else with an echo."""

    def __init__(self, output_schemas: dict[tuple[str, str], dict[str, Any]] | None = None
                 ) -> None:
        self.output_schemas = output_schemas or {}

    async def call_tool(self, server: str, tool: str, args: dict[str, Any],
                        timeout: float | None = None) -> ToolResult:
        schema = self.output_schemas.get((server, tool))
        if schema:
            return ToolResult(sample(schema), "", False)
        return ToolResult(None, f"{MARK} {server}.{tool}({json.dumps(args, sort_keys=True)})",
                          False)

    async def function_tools(self, refs: list[str]) -> list[dict[str, Any]]:
        return []

    async def start(self, server: str) -> None:
        return None

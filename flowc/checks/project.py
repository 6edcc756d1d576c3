"""Project checks (need `flowc.yaml`): model names, MCP servers, tools and tool params."""

from __future__ import annotations

from typing import Any

from flowc import types as T
from flowc.context import Context, StepInfo
from flowc.expr import single_reference
from flowc.model import LLMStep, MCPToolStep
from flowc.schemas import json_path, schema_key, schema_validator
from flowc.source import Span
from flowc.validate import did_you_mean, suggest

_SAMPLES: dict[str, Any] = {
    "string": "", "integer": 0, "number": 0.5, "boolean": False, "object": {}, "array": [],
    "null": None,
}


def check_project(ctx: Context) -> None:
    for info in ctx.steps.values():
        step = info.step
        if isinstance(step, LLMStep):
            _check_model(ctx, info, step)
            for i, name in enumerate(step.fallback_models):  # checked as `model:` is
                _check_model_name(ctx, name, ctx.source.span_of(
                    (*ctx.step_path(step.id), "fallback_models", i)))
            for i, tool_ref in enumerate(step.tool_refs):
                _check_tool_ref(ctx, info, i, tool_ref, isinstance(step.tools, str))
        elif isinstance(step, MCPToolStep):
            _check_mcp_step(ctx, info, step)


def _check_model(ctx: Context, info: StepInfo, step: LLMStep) -> None:
    _check_model_name(ctx, step.model, ctx.source.span_of((*ctx.step_path(step.id), "model")))


def _check_model_name(ctx: Context, model: str, span: Span) -> None:
    config = ctx.config
    if config is None:
        return
    target = config.resolve_model(model)
    if target is not None:
        _check_listed(ctx, model, target, span)
        return
    if "/" in model:
        provider = model.partition("/")[0]
        hint = did_you_mean(provider, config.provider_names)
        ctx.out.add("unknown-model", f"unknown provider '{provider}' in model '{model}'"
                    + suggest(hint), span.start, span.end,
                    help=f"providers: {', '.join(config.provider_names)}")
        return
    hint = did_you_mean(model, config.models)
    aliases = ", ".join(sorted(config.models)) or "none defined"
    ctx.out.add("unknown-model", f"unknown model '{model}'"
                + suggest(hint), span.start, span.end,
                help=f"use an alias from flowc.yaml ({aliases}), provider/model "
                     "(ollama/llama3.2) or a bare name: gpt-4o-mini, claude-sonnet-4-6, "
                     "Ollama's name:tag")


def _check_listed(ctx: Context, name: str, target: tuple[str, str], span: Span) -> None:
    """A provider model written in the pipeline (not an alias flowc.yaml declares) that the
    price data does not list is likely a typo (`gpt-4o-minii`) or a model too new for the
    price data: a warning, since the provider may still serve it."""
    config = ctx.config
    assert config is not None
    provider, model = target
    if name in config.models or f"{provider}/{model}" in config.prices:
        return
    from flowc.known_models import price_data_knows

    if price_data_knows(provider, model) is not False:
        return
    ctx.out.add("unlisted-model", f"the price data lists no {provider} model '{model}'",
                span.start, span.end,
                help="check the spelling; if the model exists, declare it in flowc.yaml "
                     f"(an alias under `models:`, or its price under `prices: "
                     f"{{{provider}/{model}: ...}}`) so its calls are priced")


def _server_known(ctx: Context, server: str, path: tuple[Any, ...]) -> bool:
    if ctx.config is None or server in ctx.config.mcp_servers:
        return True
    span = ctx.source.span_of(path)
    hint = did_you_mean(server, ctx.config.mcp_servers)
    known = ", ".join(sorted(ctx.config.mcp_servers)) or "none"
    ctx.out.add("unknown-mcp-server", f"unknown MCP server '{server}'"
                + suggest(hint), span.start, span.end,
                help=f"servers in flowc.yaml `mcpServers`: {known}")
    return False


def _tool_known(ctx: Context, server: str, tool: str, path: tuple[Any, ...],
                span: tuple[int, int] | None = None) -> bool:
    tools = ctx.catalog.tools_of(server) if ctx.catalog else None
    if tools is None or tool in tools:
        return True
    s = ctx.source.span_of(path)
    start, end = span or (s.start, s.end)
    hint = did_you_mean(tool, tools)
    ctx.out.add("unknown-tool", f"MCP server '{server}' has no tool '{tool}'"
                + suggest(hint), start, end,
                help=f"its tools: {', '.join(sorted(tools))}")
    return False


def _check_tool_ref(ctx: Context, info: StepInfo, i: int, ref: str, single: bool) -> None:
    path = (*ctx.step_path(info.step.id), "tools", *(() if single else (i,)))
    server, dot, tool = ref.partition(".")
    if not dot or not server or not tool:
        span = ctx.source.span_of(path)
        ctx.out.add("invalid-value", f"invalid tool reference '{ref}': write server.tool or "
                    "server.*", span.start, span.end)
        return
    if _server_known(ctx, server, path) and tool != "*":
        _tool_known(ctx, server, tool, path)


def _check_mcp_step(ctx: Context, info: StepInfo, step: MCPToolStep) -> None:
    base = ctx.step_path(step.id)
    if not _server_known(ctx, step.server, (*base, "server")):
        return
    if not _tool_known(ctx, step.server, step.tool, (*base, "tool")):
        return
    tools = ctx.catalog.tools_of(step.server) if ctx.catalog else None
    if not tools or step.id in ctx.partial:  # a misspelt `params` was already reported
        return
    schema = tools[step.tool].input_schema
    if not schema:
        return
    instance, unknown = _params_instance(ctx, info, step.params)
    for where, keyword, message in _schema_errors(ctx, (step.server, step.tool), schema,
                                                  instance):
        if any(where[: len(u)] == u for u in unknown):
            continue  # the value comes from a reference whose type is not known
        if keyword == "required" or not where:
            span = ctx.source.span_of((*base, "params"), key=True)
        else:
            span = ctx.source.span_of((*base, "params", *where))
        at = "params" + json_path(where)
        ctx.out.add("tool-params", f"{at}: {message} (tool '{step.server}.{step.tool}')",
                    span.start, span.end)


SchemaError = tuple[tuple[Any, ...], str, str]  # where in the params, keyword, message


def _schema_errors(ctx: Context, tool: tuple[str, str], schema: dict[str, Any],
                   instance: Any) -> list[SchemaError]:
    """The ways ``instance`` breaks the tool's input schema. Steps calling one tool mostly
    pass params of the same shape: the schema is checked and its validator built once (see
    flowc/schemas.py), and each distinct instance validated once (10,000 steps calling 4
    tools: 3.1 s of checking became ~0.05 s). A server's broken schema is not the
    pipeline's mistake: nothing is reported against it."""
    key = (tool, schema_key(instance))
    found = ctx.schema_errors.get(key)
    if found is not None:
        return found
    validator = schema_validator(schema_key(schema))
    found = [] if validator is None else [
        (tuple(e.absolute_path), str(e.validator), e.message)
        for e in validator.iter_errors(instance)]
    ctx.schema_errors[key] = found
    return found


def _params_instance(ctx: Context, info: StepInfo, value: Any,
                     at: tuple[Any, ...] = ()) -> tuple[Any, list[tuple[Any, ...]]]:
    """``value`` with each reference replaced by a sample of its static type; the paths of
    references whose type is unknown are returned so their findings are dropped."""
    if isinstance(value, str):
        ref = single_reference(value)
        if ref is None:
            return value, []
        t = ctx.ref_types.get(ref, T.ANY)
        if t.kind == "any":
            return None, [at]
        return _SAMPLES[t.kind], []
    if isinstance(value, dict):
        out, unknown = {}, []
        for k, v in value.items():
            out[k], u = _params_instance(ctx, info, v, (*at, k))
            unknown += u
        return out, unknown
    if isinstance(value, list):
        items, unknown = [], []
        for i, v in enumerate(value):
            item, u = _params_instance(ctx, info, v, (*at, i))
            items.append(item)
            unknown += u
        return items, unknown
    return value, []


"""Ollama's native `/api/chat`, translated to and from OpenAI's Chat Completions.

Tools go through `/api/chat`'s own `tools` field (never a prompt trick); `tool_calls` come
back with arguments as objects and no ids, so ids are minted here. A forced tool (`tool_choice`
naming a function, or `required`) has no field in Ollama's API: it is forced through `format`,
whose JSON schema constrains the answer to that tool's arguments (or, for `required` with
several tools, to `{"name", "arguments"}` of one of them), and the answer comes back as that
tool's call. `parallel_tool_calls: false` keeps the first call. `reasoning_effort` becomes
`think`, and `thinking` in the answer `reasoning_content`. Usage comes from
`prompt_eval_count` / `eval_count` (in a stream, only on the final `done` line). Images must
be inline (base64): Ollama cannot fetch URLs, so an image URL is refused. Fields that only
hint are dropped; what would change the answer's meaning (`n > 1`, `logprobs`, ...) is
refused in OpenAI's words. The table: docs/wires/ollama.md.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from runtime.providers.base import (
    SHAPE_ERRORS,
    ChatResult,
    Endpoint,
    RequestError,
    StreamState,
    UnsupportedFeature,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    Usage,
    answer_chars,
    estimate_usage,
)

# The chat completions fields this adapter maps onto Ollama's API (the Messages translation
# passes a field on only when it is here). Any other field only hints and is dropped, except
# those `_refuse_meaning_changers` refuses.
_HANDLED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
            "stop", "stream", "stream_options", "tools", "tool_choice", "parallel_tool_calls",
            "response_format", "seed", "n", "user", "reasoning_effort", "presence_penalty",
            "frequency_penalty"}
# `reasoning_effort` as Ollama's `think` (a boolean or a level: low, medium, high, max), as
# Ollama's own OpenAI-compatible endpoint maps it: past either end of Ollama's scale, the
# nearest level.
THINK: dict[str, bool | str] = {"none": False, "minimal": "low", "low": "low",
                                "medium": "medium", "high": "high", "xhigh": "max"}
_OPTIONS = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")


@dataclass(frozen=True)
class Reading:
    """How Ollama's answer is read back: ``forced`` names the tools one of which the answer
    must call (its content is then that call, as `format` constrained it); ``one_call``
    keeps only the first tool call (`parallel_tool_calls: false`)."""

    forced: tuple[str, ...] = ()
    one_call: bool = False


# -- request -----------------------------------------------------------------------------------
def _unsupported_parameter(name: str, model: str) -> RequestError:
    return RequestError(f"Unsupported parameter: '{name}' is not supported with this model "
                        f"({model} on Ollama).", param=name, code="unsupported_parameter")


def _refuse_meaning_changers(req: dict[str, Any], model: str) -> None:
    """Refuse what Ollama cannot answer as asked (more answers, token probabilities, banned
    tokens, audio, web search, legacy functions); everything else it has no field for only
    hints and is dropped (see docs/wires/ollama.md)."""
    n = req.get("n")
    if n not in (None, 1):
        raise RequestError(f"Unsupported value: 'n' does not support {n} with this model "
                           f"({model} on Ollama). Only the default (1) value is supported.",
                           param="n", code="unsupported_value")
    for name in ("logprobs", "top_logprobs", "logit_bias", "audio", "functions",
                 "function_call"):
        if req.get(name):
            raise _unsupported_parameter(name, model)
    if req.get("web_search_options") is not None:
        raise _unsupported_parameter("web_search_options", model)
    modalities = req.get("modalities")
    if isinstance(modalities, list) and "audio" in modalities:
        raise RequestError(f"Unsupported value: 'modalities' does not support 'audio' with "
                           f"this model ({model} on Ollama).", param="modalities",
                           code="unsupported_value")


def _text(content: Any) -> tuple[str, list[str]]:
    """Text and base64 images of an OpenAI message content."""
    if content is None or isinstance(content, str):
        return content or "", []
    text, images = [], []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            text.append(part.get("text", ""))
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            if not url.startswith("data:"):
                raise UnsupportedFeature("ollama", "image URLs (send images inline as data: "
                                         "URLs)", "messages")
            images.append(url.partition(",")[2])
        else:
            raise UnsupportedFeature("ollama", f"'{kind}' message parts", "messages")
    return "".join(text), images


def _messages(req: dict[str, Any]) -> list[dict[str, Any]]:
    names: dict[str, str] = {}  # tool call id -> tool name, for tool result messages
    messages = []
    for msg in req.get("messages") or []:
        role = msg.get("role")
        text, images = _text(msg.get("content"))
        out: dict[str, Any] = {"role": "system" if role == "developer" else role,
                               "content": text}
        if images:
            out["images"] = images
        thinking = msg.get("reasoning_content") or msg.get("reasoning")
        if role == "assistant" and isinstance(thinking, str) and thinking:
            out["thinking"] = thinking
        if role == "assistant" and msg.get("tool_calls"):
            calls = []
            for call in msg["tool_calls"]:
                fn = call.get("function") or {}
                names[call.get("id", "")] = fn.get("name", "")
                try:
                    args = orjson.loads(fn.get("arguments") or "{}")
                except orjson.JSONDecodeError:
                    raise RequestError(f"tool call {call.get('id')} has arguments that are "
                                       "not JSON", param="messages") from None
                calls.append({"function": {"name": fn.get("name"), "arguments": args}})
            out["tool_calls"] = calls
        if role == "tool" and msg.get("tool_call_id") in names:
            out["tool_name"] = names[msg["tool_call_id"]]
        messages.append(out)
    return messages


def _name(tool: dict[str, Any]) -> str:
    return str((tool.get("function") or {}).get("name") or "")


def _tools(req: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """The tools to send and whether one of them must be called, from `tools` and
    `tool_choice` (`none` sends none; a named function or `allowed_tools` only those)."""
    tools = [t for t in req.get("tools") or () if isinstance(t, dict)]
    choice = req.get("tool_choice")
    if not tools or choice in (None, "auto"):
        return tools, False
    if choice == "none":
        return [], False
    if choice == "required":
        return tools, True
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "function":
        wanted = {str((choice.get("function") or {}).get("name") or "")}
        forced = True
    elif kind == "allowed_tools":
        allowed = choice.get("allowed_tools") or {}
        wanted = {_name(t) for t in allowed.get("tools") or () if isinstance(t, dict)}
        forced = allowed.get("mode") == "required"
    else:
        raise RequestError(f"Invalid value for 'tool_choice': {choice!r}.",
                           param="tool_choice", code="invalid_value")
    picked = [t for t in tools if _name(t) in wanted]
    if not picked:
        raise RequestError(f"Invalid value for 'tool_choice': no function named "
                           f"{' or '.join(sorted(repr(w) for w in wanted))} in 'tools'.",
                           param="tool_choice", code="invalid_value")
    return picked, forced


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    params = (tool.get("function") or {}).get("parameters")
    return params if isinstance(params, dict) else {"type": "object", "properties": {}}


def _forcing(tools: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The `format` schema and the instruction that make the answer a call of one of
    ``tools``: one tool's arguments as they stand, or `{"name", "arguments"}` for several."""
    if len(tools) == 1:
        return _parameters(tools[0]), (
            f"Call the function '{_name(tools[0])}' now: answer with its arguments only, as "
            "one JSON object that matches its parameters.")
    names = [_name(t) for t in tools]
    schema = {"anyOf": [{"type": "object", "properties": {
        "name": {"type": "string", "enum": [_name(t)]}, "arguments": _parameters(t)},
        "required": ["name", "arguments"]} for t in tools]}
    return schema, ("Call one of the functions " + ", ".join(f"'{n}'" for n in names)
                    + ' now: answer only with one JSON object {"name": <the function\'s '
                    'name>, "arguments": <its arguments>}.')


def _instruct(messages: list[dict[str, Any]], instruction: str) -> None:
    """``instruction`` at the end of the first system message, or as a new first one (chat
    templates take a system message first)."""
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        first["content"] = (first["content"] + "\n\n" if first["content"] else "") + instruction
    else:
        messages.insert(0, {"role": "system", "content": instruction})


def _think(effort: Any) -> bool | str | None:
    if effort is None:
        return None
    if isinstance(effort, str) and effort in THINK:
        return THINK[effort]
    supported = ", ".join(f"'{e}'" for e in list(THINK)[:-1]) + f", and '{list(THINK)[-1]}'"
    raise RequestError(f"Invalid value: '{effort}'. Supported values are: {supported}.",
                       param="reasoning_effort", code="invalid_value")


def build_request(req: dict[str, Any], model: str, stream: bool
                  ) -> tuple[dict[str, Any], Reading]:
    """The `/api/chat` body, and how its answer is to be read back."""
    _refuse_meaning_changers(req, model)
    messages = _messages(req)
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": stream}
    options: dict[str, Any] = {k: req[k] for k in _OPTIONS if req.get(k) is not None}
    if req.get("max_completion_tokens") or req.get("max_tokens"):
        options["num_predict"] = req.get("max_completion_tokens") or req.get("max_tokens")
    if req.get("stop"):
        options["stop"] = [req["stop"]] if isinstance(req["stop"], str) else list(req["stop"])
    if options:
        body["options"] = options
    think = _think(req.get("reasoning_effort"))
    if think is not None:
        body["think"] = think
    tools, forced = _tools(req)
    if tools:
        body["tools"] = tools
    rf = req.get("response_format") or {}
    if forced:  # the answer is the call: a response_format for text has nothing to shape
        body["format"], instruction = _forcing(tools)
        _instruct(messages, instruction)
    elif rf.get("type") == "json_object":
        body["format"] = "json"
    elif rf.get("type") == "json_schema":
        body["format"] = (rf.get("json_schema") or {}).get("schema") or "json"
    return body, Reading(tuple(_name(t) for t in tools) if forced else (),
                         req.get("parallel_tool_calls") is False)


# -- answer ------------------------------------------------------------------------------------
def usage_of(body: dict[str, Any], estimate: Usage | None = None) -> Usage:
    """`prompt_eval_count` / `eval_count`; Ollama leaves a count out at times (the prompt
    count when the prompt was cached): then ``estimate``'s count stands in, marked."""
    prompt, completion = body.get("prompt_eval_count"), body.get("eval_count")
    if estimate is not None and (prompt is None or completion is None):
        return Usage(prompt_tokens=estimate.prompt_tokens if prompt is None else int(prompt),
                     completion_tokens=estimate.completion_tokens if completion is None
                     else int(completion), estimated=True)
    return Usage(prompt_tokens=int(prompt or 0), completion_tokens=int(completion or 0))


def _counted(body: dict[str, Any]) -> bool:
    return "prompt_eval_count" in body and "eval_count" in body


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _tool_calls(message: dict[str, Any], start: int = 0) -> list[dict[str, Any]]:
    calls = []
    for i, call in enumerate(message.get("tool_calls") or (), start=start):
        fn = call.get("function") or {}
        args = fn.get("arguments")
        calls.append({"index": i, "id": call.get("id") or _call_id(), "type": "function",
                      "function": {"name": fn.get("name"),
                                   "arguments": args if isinstance(args, str)
                                   else orjson.dumps(args or {}).decode()}})
    return calls


def forced_call(content: str, forced: tuple[str, ...]) -> dict[str, Any] | None:
    """The tool call a forced answer's content makes: the arguments themselves for one
    tool, `{"name", "arguments"}` for several; None when it is not one (cut short, or a
    model that did not keep to the format)."""
    text = content.strip()
    if not text:
        return None
    if len(forced) == 1:
        return {"index": 0, "id": _call_id(), "type": "function",
                "function": {"name": forced[0], "arguments": text}}
    try:  # the standard library's JSON keeps integers of any size exact (orjson's do not)
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in forced:
        return None
    args = value.get("arguments")
    return {"index": 0, "id": _call_id(), "type": "function",
            "function": {"name": value["name"], "arguments": json.dumps(
                args if args is not None else {}, ensure_ascii=False)}}


def _finish(body: dict[str, Any], had_tools: bool) -> str:
    if body.get("done_reason") == "length":
        return "length"
    return "tool_calls" if had_tools else "stop"


def to_openai(body: dict[str, Any], reading: Reading = Reading(),
              usage: Usage | None = None) -> dict[str, Any]:
    message = body.get("message") or {}
    content = message.get("content") or None
    calls = _tool_calls(message)
    if reading.forced and not calls and content:
        call = forced_call(content, reading.forced)
        if call is not None:
            calls, content = [call], None
    if reading.one_call:
        calls = calls[:1]
    out_msg: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        out_msg["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
    if message.get("thinking"):
        out_msg["reasoning_content"] = message["thinking"]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [{"index": 0, "message": out_msg, "finish_reason": _finish(body, bool(calls)),
                     "logprobs": None}],
        "usage": (usage or usage_of(body)).to_openai(),
    }


def _reasoning_chars(body: dict[str, Any]) -> int:
    for choice in body.get("choices") or ():
        return len((choice.get("message") or {}).get("reasoning_content") or "")
    return 0


async def complete(ep: Endpoint, req: dict[str, Any], model: str) -> ChatResult:
    payload, reading = build_request(req, model, False)
    status, headers, raw, ms = await ep.post("/api/chat", payload, {})
    if status >= 400:
        raise ep.error(status, headers, raw)
    body = ep.parse(raw)
    try:
        if not isinstance(body, dict) or not isinstance(body.get("message"), dict):
            raise TypeError("not a chat response object")
        out = to_openai(body, reading)
        usage = usage_of(body, None if _counted(body) else estimate_usage(
            req, answer_chars(out) + _reasoning_chars(out)))
        out["usage"] = usage.to_openai()
    except SHAPE_ERRORS as exc:
        raise ep.malformed(raw, str(exc)) from None
    return ChatResult(out, usage, ms)


class _StreamReader:
    """Ollama's NDJSON lines as `chat.completion.chunk`s. A forced tool's content streams
    as that call's argument deltas (one tool), or is gathered and read as one call when the
    stream ends (several: the name comes inside the JSON)."""

    def __init__(self, ep: Endpoint, req: dict[str, Any], model: str, reading: Reading,
                 state: StreamState) -> None:
        self.ep, self.req, self.reading, self.state = ep, req, reading, state
        self.base: dict[str, Any] = {"id": f"chatcmpl-{uuid.uuid4().hex}",
                                     "object": "chat.completion.chunk",
                                     "created": int(time.time()), "model": model}
        self.started = False  # the role chunk goes out with the first line, not before
        self.n_tools = 0
        self.forced_id: str | None = None  # the single forced call, once opened
        self.gathered: list[str] = []  # a several-tool forced answer's content

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**self.base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                          "logprobs": None}]}

    def _content(self, content: str) -> list[dict[str, Any]]:
        forced = self.reading.forced
        if not forced or (self.n_tools and self.forced_id is None):
            return [self.chunk({"content": content})]
        if len(forced) > 1:
            self.gathered.append(content)
            return []
        if self.forced_id is None:
            content = content.lstrip()
            if not content:
                return []
            self.forced_id, self.n_tools = _call_id(), 1
            return [self.chunk({"tool_calls": [{
                "index": 0, "id": self.forced_id, "type": "function",
                "function": {"name": forced[0], "arguments": content}}]})]
        return [self.chunk({"tool_calls": [{"index": 0, "function": {"arguments": content}}]})]

    def _calls(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        if self.forced_id is not None:
            return []  # the forced call is already this answer's call
        calls = _tool_calls(message, self.n_tools)
        if self.reading.one_call:
            calls = calls[:max(0, 1 - self.n_tools)]
        if not calls:
            return []
        self.n_tools += len(calls)
        self.gathered.clear()  # a native call answers a forced request by itself
        self.state.out_chars += sum(len(c["function"]["arguments"]) for c in calls)
        return [self.chunk({"tool_calls": calls})]

    def read(self, line: bytes) -> list[dict[str, Any]]:
        """The chunks one line of the stream makes."""
        body = self.ep.parse(line)
        if not isinstance(body, dict):
            raise TypeError("not a chat response object")
        if body.get("error"):
            raise UpstreamError(self.ep.name, 500, str(body["error"]))
        state, out = self.state, []
        if not self.started:
            self.started = True
            out.append(self.chunk({"role": "assistant", "content": ""}))
        self.base["model"] = body.get("model") or self.base["model"]
        message = body.get("message") or {}
        thinking = message.get("thinking")
        if thinking:
            state.mark_token()
            state.out_chars += len(thinking)
            out.append(self.chunk({"reasoning_content": thinking}))
        content = message.get("content")
        if content:
            state.mark_token()
            state.out_chars += len(content)
            out.extend(self._content(content))
        if message.get("tool_calls"):
            state.mark_token()
            out.extend(self._calls(message))
        if body.get("done"):
            if self.gathered:
                call = forced_call("".join(self.gathered), self.reading.forced)
                if call is not None:
                    self.n_tools = 1
                    out.append(self.chunk({"tool_calls": [call]}))
                else:
                    out.append(self.chunk({"content": "".join(self.gathered)}))
            state.usage = usage_of(body, None if _counted(body)
                                   else estimate_usage(self.req, state.out_chars))
            state.finish_reason = _finish(body, self.n_tools > 0)
            out.append(self.chunk({}, state.finish_reason))
            out.append({**self.base, "choices": [], "usage": state.usage.to_openai()})
        return out


async def stream(ep: Endpoint, req: dict[str, Any], model: str, state: StreamState
                 ) -> AsyncIterator[dict[str, Any]]:
    payload, reading = build_request(req, model, True)
    resp = await ep.open_stream("/api/chat", payload, {})
    reader = _StreamReader(ep, req, model, reading, state)
    try:
        async for raw in resp.content:
            line = raw.strip()
            if not line:
                continue
            try:
                chunks = reader.read(line)
            except SHAPE_ERRORS as exc:
                raise ep.malformed(line, str(exc)) from None
            for c in chunks:
                yield c
            if state.usage is not None:
                return
        raise UpstreamError(ep.name, 502, "the stream ended before its final line")
    except TimeoutError:
        raise UpstreamTimeout(ep.name, ep.timeout) from None
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        raise UpstreamUnavailable(ep.name, f"stream cut off: {type(exc).__name__}") from None
    finally:
        resp.release()

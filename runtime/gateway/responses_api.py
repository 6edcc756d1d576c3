"""`POST /v1/responses`: the OpenAI Responses API in front of every provider.

Same wire (OpenAI itself: the endpoint named `openai`): the client's body goes to
`{base_url}/responses` as it came, unknown fields and all, with only `model` replaced by the
target's (re-serialised only when it differs) and the client's credential replaced by the
endpoint's key; the answer's bytes (or its stream, event by event) come back as OpenAI sent
them, read on the way for the ledger's usage. Other OpenAI-compatible servers mostly serve
chat completions only, so they get the translation.

Across wires (Anthropic, Ollama, OpenAI-compatible servers): the request is translated to
chat completions and sent through that provider's adapter; the answer (or its stream) is
translated back to a Response object (or the Responses event sequence). The table, field by
field: docs/wires/responses.md.

`previous_response_id` is answered from OpenAI's own store on the same wire, and from
flowc's for the responses OpenAI does not keep: the `Conversations` the server chose at
start-up (runtime/gateway/responses_store.py: this process's memory, the supervisor's with
workers, or the shared Postgres), on the caller as `caller.conversations`.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.responses import Response

from runtime.gateway.anthropic_api import max_output, reasons
from runtime.gateway.calls import ModelCaller
from runtime.gateway.incoming import Incoming
from runtime.gateway.openai_api import (
    GatewayStream,
    answer,
    error_response,
    parse_body,
    refused,
    stream_headers,
)
from runtime.gateway.responses_store import Conversations
from runtime.gateway.validate import check
from runtime.providers import (
    ADAPTERS,
    ChatResult,
    Endpoint,
    FlowcError,
    RequestError,
    StreamState,
    Target,
    Usage,
)
from runtime.providers.base import estimate_usage
from runtime.providers.openai import post_responses, stream_responses

# A namespace tool's functions as chat tools are named `<namespace>__<name>`; a call of one
# comes back as `name` with its `namespace`, as OpenAI answers it.
NS_SEP = "__"
# Tools OpenAI runs itself: passed to OpenAI, dropped elsewhere (named in x-flowc-warning).
_FUNCTION_TOOLS = ("function", "namespace")
_MESSAGE_ROLES = ("user", "assistant", "system", "developer")
# Fields that change what the answer is, which no chat target can honour.
_REFUSED = {"background": "background mode", "conversation": "conversations",
            "prompt": "prompt templates"}
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_EFFORT_OPENAI = {"minimal": "low", "xhigh": "high", "max": "high"}


def _passes(kind: str, name: str) -> bool:
    """Whether the chat adapter for ``kind`` passes ``name`` on (OpenAI's passes any)."""
    handled = getattr(ADAPTERS[kind], "_HANDLED", None)
    return handled is None or name in handled


def verbatim(ep: Endpoint) -> bool:
    """Whether ``ep`` serves the Responses API itself: OpenAI does; another OpenAI-compatible
    server does when flowc.yaml says `responses: true` for it."""
    return ep.kind == "openai" and ep.responses


def _bad(message: str, param: str) -> RequestError:
    return RequestError(message, param=param, code="invalid_value")


# -- the request -----------------------------------------------------------------------------
def input_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's `input` as a list of items (a string is one user message)."""
    value = body.get("input")
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise RequestError(f"Invalid type for 'input[{i}]': expected an object, but got "
                               f"{type(item).__name__} instead.", param=f"input[{i}]",
                               code="invalid_type")
    return list(value)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return "".join(str(p.get("text") or p.get("refusal") or "") for p in content
                   if isinstance(p, dict))


def _parts(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A message's content as chat content: text, or text and image parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"Invalid type for '{where}.content': expected a string or an "
                           f"array, but got {type(content).__name__} instead.",
                           param=f"{where}.content", code="invalid_type")
    parts: list[dict[str, Any]] = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            parts.append({"type": "text", "text": p.get("text") or ""})
        elif kind == "refusal":
            parts.append({"type": "text", "text": p.get("refusal") or ""})
        elif kind == "input_image":
            url = p.get("image_url")
            if not url:
                raise _bad(f"{where}.content[{j}]: images by file_id need OpenAI's Files "
                           "API; send the image as image_url", f"{where}.content")
            image: dict[str, Any] = {"url": url}
            if p.get("detail") in ("low", "high"):
                image["detail"] = p["detail"]
            parts.append({"type": "image_url", "image_url": image})
        elif kind == "input_file" and p.get("file_data"):
            parts.append({"type": "file", "file": {"filename": p.get("filename") or "file",
                                                   "file_data": p["file_data"]}})
        else:
            raise _bad(f"{where}.content[{j}]: content parts of type '{kind}' are not "
                       "supported when the model is not an OpenAI model", f"{where}.content")
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _call_name(item: dict[str, Any]) -> str:
    name = str(item.get("name") or "")
    ns = item.get("namespace")
    return f"{ns}{NS_SEP}{name}" if ns else name


def _arguments(value: Any) -> str:
    """A call's arguments as the JSON text chat completions carry."""
    if isinstance(value, str):
        return value or "{}"
    return orjson.dumps(value if value is not None else {}, default=str).decode()


def _output(value: Any) -> str:
    """A function_call_output's output (a string, or text parts) as a tool message's text."""
    return value if isinstance(value, str) else _text(value)


def to_messages(items: list[dict[str, Any]], instructions: Any, kind: str
                ) -> list[dict[str, Any]]:
    """Input items as chat messages. Consecutive function calls join one assistant turn;
    a reasoning item's text rides on the next assistant turn as `reasoning_content` where
    the target reads it (Ollama's `thinking`), otherwise it is dropped."""
    messages: list[dict[str, Any]] = []
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    reasoning: str | None = None
    keep_reasoning = kind == "ollama"

    def assistant() -> dict[str, Any]:
        nonlocal reasoning
        last = messages[-1] if messages else None
        carried = reasoning if keep_reasoning else None
        reasoning = None
        if last is None or last["role"] != "assistant" or carried:
            last = {"role": "assistant", "content": None}
            if carried:
                last["reasoning_content"] = carried
            messages.append(last)
        return last

    for i, item in enumerate(items):
        kind_ = item.get("type") or ("message" if "role" in item else None)
        where = f"input[{i}]"
        if kind_ == "message":
            role = item.get("role")
            if role not in _MESSAGE_ROLES:
                raise _bad(f"Invalid value: '{role}'. Supported values are: 'user', "
                           "'assistant', 'system', and 'developer'.", f"{where}.role")
            if role == "assistant":
                msg = assistant()
                text = _text(item.get("content"))
                msg["content"] = (msg["content"] or "") + text if text else msg["content"]
            else:
                reasoning = None  # reasoning belongs to the assistant turn it precedes
                messages.append({"role": "system" if role == "developer" else role,
                                 "content": _parts(item.get("content"), where)})
        elif kind_ == "function_call":
            msg = assistant()
            msg.setdefault("tool_calls", []).append({
                "id": item.get("call_id"), "type": "function",
                "function": {"name": _call_name(item),
                             "arguments": _arguments(item.get("arguments"))}})
        elif kind_ == "function_call_output":
            reasoning = None
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": _output(item.get("output"))})
        elif kind_ == "reasoning":
            text = _text(item.get("summary")) or _text(item.get("content"))
            reasoning = text or None
        elif kind_ == "item_reference":
            raise _bad(f"{where}: item references need OpenAI's stored items; send the item "
                       "itself, or use previous_response_id", where)
        # Hosted tools' calls and outputs (web_search_call, ...) mean nothing to the target.
    return messages


def to_tools(tools: list[Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Function and namespace tools as chat tools, and the names of the tools dropped."""
    out: list[dict[str, Any]] = []
    dropped: list[str] = []

    def function(t: dict[str, Any], name: str) -> dict[str, Any]:
        fn: dict[str, Any] = {"name": name,
                              "parameters": t.get("parameters") or {"type": "object",
                                                                    "properties": {}}}
        if t.get("description"):
            fn["description"] = t["description"]
        if t.get("strict") is not None:
            fn["strict"] = t["strict"]
        return {"type": "function", "function": fn}

    for t in tools:
        kind = t.get("type") if isinstance(t, dict) else None
        if kind == "function":
            out.append(function(t, str(t.get("name") or "")))
        elif kind == "namespace":
            inner_tools = t.get("tools")
            for inner in inner_tools if isinstance(inner_tools, list) else ():
                if isinstance(inner, dict) and inner.get("type") == "function":
                    out.append(function(inner, f"{t.get('name')}{NS_SEP}{inner.get('name')}"))
                else:
                    name = inner.get("name") if isinstance(inner, dict) else None
                    dropped.append(f"{t.get('name')}.{name}")
        else:
            dropped.append(str(kind))
    return out, dropped


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": _call_name(choice)}}
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        return "required" if choice.get("mode") == "required" else "auto"
    return None  # a hosted tool's choice: the tool is not there


def to_chat(body: dict[str, Any], items: list[dict[str, Any]], kind: str, model: str
            ) -> tuple[dict[str, Any], list[str]]:
    """The chat completions request for a target of wire ``kind``, and the hosted tools
    dropped for it."""
    for name, what in _REFUSED.items():
        if body.get(name):
            raise RequestError(f"{what} ('{name}') are not supported when the model is not "
                               "an OpenAI model", param=name, code="unsupported_parameter")
    req: dict[str, Any] = {"model": model,
                           "messages": to_messages(items, body.get("instructions"), kind)}
    if not req["messages"]:
        raise RequestError("Missing required parameter: 'input'.", param="input",
                           code="missing_required_parameter")
    thinker = reasons(model) or kind != "openai"
    if isinstance(body.get("max_output_tokens"), int):
        key = "max_completion_tokens" if kind == "openai" and reasons(model) else "max_tokens"
        req[key] = max_output(kind, model, body["max_output_tokens"])
    if not (kind == "openai" and reasons(model)):
        for key in ("temperature", "top_p"):  # OpenAI's reasoners refuse them
            if body.get(key) is not None:
                req[key] = body[key]
    effort = (body.get("reasoning") or {}).get("effort")
    if isinstance(effort, str) and thinker and _passes(kind, "reasoning_effort"):
        req["reasoning_effort"] = _EFFORT_OPENAI.get(effort, effort) if kind == "openai" \
            else effort
    user = body.get("safety_identifier") or body.get("user")
    if isinstance(user, str) and user and _passes(kind, "user"):
        req["user"] = user
    tools, dropped = to_tools(body.get("tools") or [])
    if tools:
        req["tools"] = tools
        choice = _tool_choice(body.get("tool_choice"))
        if choice is not None:
            req["tool_choice"] = choice
        if body.get("parallel_tool_calls") is False and _passes(kind, "parallel_tool_calls"):
            req["parallel_tool_calls"] = False
    fmt = (body.get("text") or {}).get("format")
    fmt = fmt if isinstance(fmt, dict) else {}
    if fmt.get("type") == "json_schema":
        schema = {"name": fmt.get("name") or "output",
                  "schema": fmt.get("schema") or {"type": "object"}}
        for key in ("strict", "description"):
            if fmt.get(key) is not None:
                schema[key] = fmt[key]
        req["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif fmt.get("type") == "json_object":
        req["response_format"] = {"type": "json_object"}
    if body.get("stream"):
        req["stream"] = True
    return req, dropped


# -- the answer ------------------------------------------------------------------------------
def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage_of(u: Usage) -> dict[str, Any]:
    return {"input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens,
                                     "cache_write_tokens": u.cache_write_tokens},
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
            "total_tokens": u.total_tokens}


def _reasoning_text(part: dict[str, Any]) -> str | None:
    text = part.get("reasoning_content") or part.get("reasoning")
    return text if isinstance(text, str) and text else None


def _function_call(call_id: Any, name: str, arguments: str, status: str) -> dict[str, Any]:
    item: dict[str, Any] = {"id": _id("fc"), "type": "function_call", "status": status,
                            "call_id": call_id or _id("call"), "name": name,
                            "arguments": arguments}
    ns, sep, inner = name.partition(NS_SEP)
    if sep and ns and inner:
        item["name"], item["namespace"] = inner, ns
    return item


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message(text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": _id("msg"), "type": "message", "status": status, "role": "assistant",
            "content": [_text_part(text)] if text else []}


def _reasoning_item(text: str) -> dict[str, Any]:
    return {"id": _id("rs"), "type": "reasoning",
            "summary": [{"type": "summary_text", "text": text}] if text else []}


def _ending(finish: str | None) -> tuple[str, dict[str, Any] | None]:
    if finish == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def response_object(body: dict[str, Any], response_id: str, model: str, status: str,
                    output: list[dict[str, Any]], usage: Usage | None,
                    incomplete: dict[str, Any] | None = None,
                    error: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Response object, echoing the request's settings as OpenAI does."""
    reasoning = body.get("reasoning") or {}
    return {
        "id": response_id, "object": "response", "created_at": int(time.time()),
        "status": status, "background": False, "error": error,
        "incomplete_details": incomplete, "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"), "model": model,
        "output": output, "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "prompt_cache_key": body.get("prompt_cache_key"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "store": body.get("store", True), "temperature": body.get("temperature", 1.0),
        "text": body.get("text") or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0), "truncation": body.get("truncation", "disabled"),
        "usage": usage_of(usage) if usage is not None else None,
        "user": body.get("user"), "metadata": body.get("metadata") or {},
    }


def from_chat(chat: dict[str, Any], usage: Usage, body: dict[str, Any], response_id: str
              ) -> dict[str, Any]:
    """A chat.completion as a Response object."""
    choice = (chat.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    reasoning = _reasoning_text(message)
    if reasoning:
        output.append(_reasoning_item(reasoning))
    text = _text(message.get("content"))
    if text or message.get("refusal"):
        output.append(_message(text or str(message.get("refusal"))))
    for call in message.get("tool_calls") or ():
        fn = call.get("function") or {}
        output.append(_function_call(call.get("id"), str(fn.get("name") or ""),
                                     fn.get("arguments") or "{}", "completed"))
    status, incomplete = _ending(choice.get("finish_reason"))
    return response_object(body, response_id, str(chat.get("model") or body.get("model")),
                           status, output, usage, incomplete)


class Events:
    """Chat completion chunks -> the Responses event sequence, numbered."""

    def __init__(self, body: dict[str, Any], response_id: str) -> None:
        self.body, self.response_id = body, response_id
        self.seq = 0
        self.model = str(body.get("model") or "")
        self.output: list[dict[str, Any]] = []  # items, in output order
        self.open: dict[str, Any] | None = None  # the reasoning or message item being written
        self.calls: dict[int, dict[str, Any]] = {}  # chat tool call index -> its item
        self.finish: str | None = None
        self.started = False

    def sse(self, kind: str, data: dict[str, Any]) -> bytes:
        data = {"type": kind, **data, "sequence_number": self.seq}
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def response(self, status: str, usage: Usage | None = None,
                 incomplete: dict[str, Any] | None = None,
                 error: dict[str, Any] | None = None) -> dict[str, Any]:
        output = self.output if status != "in_progress" else []
        return response_object(self.body, self.response_id, self.model, status, output,
                               usage, incomplete, error)

    def start(self, chunk: dict[str, Any]) -> list[bytes]:
        self.started = True
        self.model = str(chunk.get("model") or self.model)
        r = self.response("in_progress")
        return [self.sse("response.created", {"response": r}),
                self.sse("response.in_progress", {"response": r})]

    def _index(self, item: dict[str, Any]) -> int:
        return self.output.index(item)

    def close_open(self) -> list[bytes]:
        item, self.open = self.open, None
        if item is None:
            return []
        i = self._index(item)
        if item["type"] == "reasoning":
            text = item["summary"][0]["text"]
            part = {"type": "summary_text", "text": text}
            return [self.sse("response.reasoning_summary_text.done", {
                        "item_id": item["id"], "output_index": i, "summary_index": 0,
                        "text": text}),
                    self.sse("response.reasoning_summary_part.done", {
                        "item_id": item["id"], "output_index": i, "summary_index": 0,
                        "part": part}),
                    self.sse("response.output_item.done", {"output_index": i, "item": item})]
        item["status"] = "completed"
        part = item["content"][0]
        return [self.sse("response.output_text.done", {
                    "item_id": item["id"], "output_index": i, "content_index": 0,
                    "text": part["text"], "logprobs": []}),
                self.sse("response.content_part.done", {
                    "item_id": item["id"], "output_index": i, "content_index": 0,
                    "part": part}),
                self.sse("response.output_item.done", {"output_index": i, "item": item})]

    def _open(self, kind: str) -> list[bytes]:
        if self.open is not None and self.open["type"] == kind:
            return []
        out = self.close_open()
        if kind == "reasoning":
            item = _reasoning_item("")
            self.output.append(item)
            out.append(self.sse("response.output_item.added", {
                "output_index": self._index(item), "item": {**item, "summary": []}}))
            item["summary"] = [{"type": "summary_text", "text": ""}]
            out.append(self.sse("response.reasoning_summary_part.added", {
                "item_id": item["id"], "output_index": self._index(item),
                "summary_index": 0, "part": {"type": "summary_text", "text": ""}}))
        else:
            item = _message("", "in_progress")
            self.output.append(item)
            out.append(self.sse("response.output_item.added", {
                "output_index": self._index(item), "item": {**item, "content": []}}))
            item["content"] = [_text_part("")]
            out.append(self.sse("response.content_part.added", {
                "item_id": item["id"], "output_index": self._index(item),
                "content_index": 0, "part": _text_part("")}))
        self.open = item
        return out

    def chunk(self, chunk: dict[str, Any]) -> list[bytes]:
        out = [] if self.started else self.start(chunk)
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            reasoning = _reasoning_text(delta)
            if reasoning:
                out += self._open("reasoning")
                item = self.open
                assert item is not None
                item["summary"][0]["text"] += reasoning
                out.append(self.sse("response.reasoning_summary_text.delta", {
                    "item_id": item["id"], "output_index": self._index(item),
                    "summary_index": 0, "delta": reasoning}))
            if isinstance(delta.get("content"), str) and delta["content"]:
                out += self._open("message")
                item = self.open
                assert item is not None
                item["content"][0]["text"] += delta["content"]
                out.append(self.sse("response.output_text.delta", {
                    "item_id": item["id"], "output_index": self._index(item),
                    "content_index": 0, "delta": delta["content"], "logprobs": []}))
            for call in delta.get("tool_calls") or ():
                out += self._call(call)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        return out

    def _call(self, call: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        index = call.get("index", 0)
        fn = call.get("function") or {}
        item = self.calls.get(index)
        if item is None:
            out += self.close_open()
            item = _function_call(call.get("id"), str(fn.get("name") or ""), "",
                                  "in_progress")
            self.calls[index] = item
            self.output.append(item)
            out.append(self.sse("response.output_item.added", {
                "output_index": self._index(item), "item": dict(item)}))
        if fn.get("arguments"):
            item["arguments"] += fn["arguments"]
            out.append(self.sse("response.function_call_arguments.delta", {
                "item_id": item["id"], "output_index": self._index(item),
                "delta": fn["arguments"]}))
        return out

    def end(self, usage: Usage) -> list[bytes]:
        out = [] if self.started else self.start({})
        out += self.close_open()
        for item in self.calls.values():
            item["status"] = "completed"
            i = self._index(item)
            out.append(self.sse("response.function_call_arguments.done", {
                "item_id": item["id"], "output_index": i, "arguments": item["arguments"]}))
            out.append(self.sse("response.output_item.done", {"output_index": i,
                                                              "item": item}))
        status, incomplete = _ending(self.finish)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        out.append(self.sse(kind, {"response": self.response(status, usage, incomplete)}))
        return out

    def failed(self, err: FlowcError) -> bytes:
        """An error after the first event: `response.failed` once the response began (the
        SDKs end the stream on it), an `error` event otherwise."""
        code = err.code or ("rate_limit_exceeded" if err.status == 429 else "server_error")
        if not self.started:
            return self.sse("error", {"code": code, "message": err.message,
                                      "param": err.param})
        return self.sse("response.failed", {"response": self.response(
            "failed", None, None, {"code": code, "message": err.message})})


# -- the handler -----------------------------------------------------------------------------
_PASSED = ("x-request-id", "openai-processing-ms")


def _passed_headers(headers: Any) -> dict[str, str]:
    """OpenAI's request id and rate-limit headers, for the client."""
    return {k.lower(): v for k, v in headers.items()
            if k.lower() in _PASSED or k.lower().startswith("x-ratelimit-")}


def _for_openai(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Kept items as OpenAI takes them back in `input`: without the ids of items it never
    stored (flowc's own, or a `store: false` answer's); a reasoning item only with its
    `encrypted_content`, which is what OpenAI reads of it then."""
    out = []
    for item in items:
        if item.get("type") == "reasoning":
            if item.get("encrypted_content"):
                out.append(item)
        else:
            out.append({k: v for k, v in item.items() if k != "id"})
    return out


class _Call:
    """How one /v1/responses request reaches each target: verbatim to OpenAI, translated
    (per target) to any other; and what it leaves in the store."""

    def __init__(self, incoming: Incoming, body: dict[str, Any], caller: ModelCaller) -> None:
        self.incoming, self.body, self.caller = incoming, body, caller
        self.store: Conversations = caller.conversations
        self.items = input_items(body)
        self.raw: bytes | None = None  # OpenAI's bytes, when it answered verbatim
        self.headers: dict[str, str] = {}
        self.response_id = _id("resp")
        self.events: Events | None = None

    # the conversation -----------------------------------------------------------------------
    async def _history(self) -> list[dict[str, Any]] | None:
        """The stored conversation `previous_response_id` names (None without one)."""
        prev = self.body.get("previous_response_id")
        if not prev:
            return None
        found = await self.store.recall(prev)
        if found is None:
            raise RequestError(f"Previous response with id '{prev}' not found.",
                               param="previous_response_id", code="previous_response_not_found")
        return found

    async def _remember(self, response_id: Any, output: Any,
                        history: list[dict[str, Any]] | None) -> None:
        """Kept before the answer (or a stream's last event) goes out: a follow-up sent the
        moment it arrives, to any worker or instance, finds it."""
        if isinstance(response_id, str) and isinstance(output, list):
            await self.store.remember(response_id, (history or []) + self.items + output)

    async def _translated(self, ep: Endpoint, target: Target
                          ) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
        history = await self._history()
        req, dropped = to_chat(self.body, (history or []) + self.items, ep.kind, target.model)
        self.headers = {}
        if dropped:  # a header value takes printable ASCII only; names are the client's
            self.headers["x-flowc-warning"] = _UNPRINTABLE.sub("?", (
                f"tools dropped for {target.provider}/{target.model}: {', '.join(dropped)} "
                "(hosted tools run on OpenAI only)"))
        return req, history

    async def _verbatim_payload(self, target: Target
                                ) -> tuple[Any, list[dict[str, Any]] | None, bool]:
        """The body for OpenAI, the flowc-kept history it carries, and whether flowc keeps
        the answer (OpenAI does not: `store: false`, or a history only flowc has)."""
        prev = self.body.get("previous_response_id")
        kept = await self.store.recall(prev) if prev else None
        own = self.body.get("store") is False or kept is not None
        if kept is not None:  # a response only flowc has: OpenAI would not find the id
            body = {k: v for k, v in self.body.items() if k != "previous_response_id"}
            return ({**body, "model": target.model, "input": _for_openai(kept) + self.items},
                    kept, own)
        if self.body.get("model") == target.model:
            return orjson.Fragment(self.incoming.body), None, own
        return {**self.body, "model": target.model}, None, own

    def _took_headers(self, headers: Any) -> None:
        self.headers = _passed_headers(headers)

    # the calls ------------------------------------------------------------------------------
    async def send(self, target: Target) -> ChatResult:
        ep = self.caller.providers.endpoint(target)
        self.raw, self.headers = None, {}
        if verbatim(ep):
            payload, kept, own = await self._verbatim_payload(target)
            raw, answer, usage, headers, ms = await post_responses(ep, payload, self.body)
            self.raw, self.headers = raw, _passed_headers(headers)
            if own:
                await self._remember(answer.get("id"), answer.get("output"), kept)
            return ChatResult(answer, usage, ms)
        req, history = await self._translated(ep, target)
        done = await self.caller.providers.complete(target, req)
        answer = from_chat(done.body, done.usage, self.body, self.response_id)
        await self._remember(self.response_id, answer["output"], history)
        return ChatResult(answer, done.usage, done.upstream_ms)

    async def open(self, target: Target, state: StreamState) -> AsyncIterator[bytes]:
        ep = self.caller.providers.endpoint(target)
        self.headers, self.events = {}, None
        if verbatim(ep):
            payload, kept, own = await self._verbatim_payload(target)
            final: list[dict[str, Any]] = []
            async for event in stream_responses(ep, payload, state, final,
                                                self._took_headers):
                if own and final:  # the last event: the response is kept before it goes
                    await self._remember(final[0].get("id"), final[0].get("output"), kept)
                    own = False
                yield event
            return
        req, history = await self._translated(ep, target)
        events = self.events = Events(self.body, self.response_id)
        async for chunk in self.caller.providers.stream(target, req, state):
            for event in events.chunk(chunk):
                yield event
        usage = state.usage or estimate_usage(self.body, state.out_chars, state.partial)
        last = events.end(usage)
        await self._remember(self.response_id, events.output, history)
        for event in last:
            yield event


async def responses(incoming: Incoming, caller: ModelCaller) -> Response:
    tags, t0 = incoming.tags, incoming.t0
    body: Any = None
    try:
        body = parse_body(incoming.body)
        check("responses", body)
        call = _Call(incoming, body, caller)
        if body.get("stream"):
            out = await caller.stream(body, tags=tags, ctx=incoming.context(), open=call.open)
            headers = stream_headers(out, t0)
            headers.update(call.headers)
            return GatewayStream(_stream_bytes(out.chunks, call), out.close, headers)
        done = await caller.complete(body, tags=tags, ctx=incoming.context(), send=call.send)
    except FlowcError as err:
        refused(caller, incoming, body, err)
        return error_response(err)
    return answer(done, t0, call.raw, call.headers)


async def _stream_bytes(chunks: AsyncIterator[bytes], call: _Call) -> AsyncIterator[bytes]:
    """The stream's events; an error after the first byte travels as a Responses event
    (none after an upstream's own `response.failed` or `error`, already sent)."""
    try:
        async for event in chunks:
            yield event
    except FlowcError as err:
        if getattr(err, "sent", False):
            return
        events = call.events or Events(call.body, call.response_id)
        events.seq = max(events.seq, getattr(err, "sequence_number", 0))
        yield events.failed(err)

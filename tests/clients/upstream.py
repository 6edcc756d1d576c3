"""Loopback models for the real clients: scripted agents that speak each provider's wire.

A real client sends what it likes (side calls for titles, a dozen tools, its own system
prompt), so each upstream answers by reading the request rather than from a fixed queue:
a request that carries a tool result gets the final answer; one that offers the tool the
test names gets a call to that tool; anything else gets plain text. Streams are written as
the references show them: OpenAI chat chunks with tool-call deltas, the Responses API's
event sequence with reasoning items (tests/fakes_responses), Anthropic's content blocks
with thinking and signature deltas (anthropic-sdk-python `types`), Ollama's NDJSON
(tests/fakes).
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.fakes import (
    Action,
    Recorded,
    _sse,
    ollama_text,
    ollama_tool_call,
    openai_text,
    openai_tool_call,
)
from tests.fakes_responses import (
    call_item,
    reasoning_item,
    responses_answer,
    text_item,
)
from tests.fakes_responses import usage as responses_usage


class Script(deque):
    """A FakeServer script that never runs dry: queued actions first, then ``fallback``
    for every later request (clearing it keeps the fallback)."""

    def __init__(self, fallback: Action) -> None:
        super().__init__()
        self.fallback = fallback

    def __bool__(self) -> bool:
        return True

    def popleft(self) -> Action:
        return super().popleft() if len(self) else self.fallback


@dataclass(frozen=True)
class Turn:
    """What the loopback model does in one conversation: call ``tool`` with ``arguments``
    when the client offers it, then, once a tool result is back, answer ``answer`` (or, for
    a structured answer given through a tool, call ``final_tool`` with ``final_arguments``).
    ``thinking``: reasoning sent first when the request asks for it (Anthropic thinking, a
    Responses reasoning item)."""

    tool: str | None = None
    arguments: dict[str, Any] | None = None
    answer: str = "All done."
    final_tool: str | None = None
    final_arguments: dict[str, Any] | None = None
    thinking: str | None = None


# -- reading a request, per wire ---------------------------------------------------------------
def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_text(p.get("text", p.get("content", p.get("output", ""))))
                         if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else json.dumps(content)


def wire(rec: Recorded) -> str:
    """The wire a recorded request speaks: chat, responses, messages or ollama."""
    if rec.path.endswith("/responses"):
        return "responses"
    if rec.path.endswith("/messages"):
        return "messages"
    if rec.path.startswith("/api/"):
        return "ollama"
    return "chat"


def tool_results(rec: Recorded) -> list[str]:
    """The text of every tool result in a request, in any wire."""
    body, kind = rec.body, wire(rec)
    if kind == "responses":
        items = body.get("input") if isinstance(body.get("input"), list) else []
        return [_text(i.get("output")) for i in items
                if isinstance(i, dict) and i.get("type") == "function_call_output"]
    if kind == "messages":
        return [_text(b.get("content")) for m in body.get("messages") or []
                if isinstance(m.get("content"), list)
                for b in m["content"] if isinstance(b, dict) and b.get("type") == "tool_result"]
    return [_text(m.get("content")) for m in body.get("messages") or []
            if m.get("role") == "tool"]


def tool_names(rec: Recorded) -> list[str]:
    """The names of the function tools a request offers (Responses namespaces included)."""
    names: list[str] = []
    for t in rec.body.get("tools") or []:
        if t.get("type") == "namespace":
            names += [s.get("name", "") for s in t.get("tools") or []]
        names.append(t.get("name") or (t.get("function") or {}).get("name", ""))
    return names


def _decide(turn: Turn, rec: Recorded) -> tuple[str, Any]:
    """("call", (name, args)) or ("text", answer) for this request."""
    if tool_results(rec):
        if turn.final_tool and turn.final_tool in tool_names(rec):
            return "call", (turn.final_tool, turn.final_arguments or {})
        return "text", turn.answer
    if turn.tool and turn.tool in tool_names(rec):
        return "call", (turn.tool, turn.arguments or {})
    if turn.final_tool and turn.final_tool in tool_names(rec):
        return "call", (turn.final_tool, turn.final_arguments or {})
    return "text", turn.answer


# -- OpenAI chat completions: streamed tool calls -----------------------------------------------
def openai_stream_tool_call(name: str, arguments: dict[str, Any],
                            call_id: str = "call_DdmO9pD3xa9XTPNJ32zg2hcA") -> Action:
    """A streamed tool call: the id and name in the first delta, the arguments in pieces."""
    def act(rec: Recorded) -> Any:
        async def write(resp: web.StreamResponse, _req: web.Request) -> None:
            base = {"id": "chatcmpl-9lanOqIALplD3Ih6yb4NTJhLvsfbb",
                    "object": "chat.completion.chunk", "created": 1721223196,
                    "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_8b761cb050"}

            def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
                return _sse({**base, "choices": [{"index": 0, "delta": delta,
                                                  "logprobs": None, "finish_reason": finish}]})
            await resp.write(chunk({"role": "assistant", "content": None, "tool_calls": [{
                "index": 0, "id": call_id, "type": "function",
                "function": {"name": name, "arguments": ""}}]}))
            raw = json.dumps(arguments)
            step = max(1, len(raw) // 3)
            for k in range(0, len(raw), step):
                await resp.write(chunk({"tool_calls": [{
                    "index": 0, "function": {"arguments": raw[k:k + step]}}]}))
            await resp.write(chunk({}, "tool_calls"))
            if (rec.body.get("stream_options") or {}).get("include_usage"):
                await resp.write(_sse({**base, "choices": [], "usage": {
                    "prompt_tokens": 82, "completion_tokens": 17, "total_tokens": 99}}))
            await resp.write(b"data: [DONE]\n\n")
        return write
    return act


def _chat(turn: Turn, rec: Recorded) -> Any:
    what, value = _decide(turn, rec)
    if what == "text":
        return openai_text(value)(rec)
    name, args = value
    if rec.body.get("stream"):
        return openai_stream_tool_call(name, args)(rec)
    return openai_tool_call(name, args)(rec)


# -- OpenAI Responses API (the answers and event sequence of tests/fakes_responses) --------------
def _responses(turn: Turn, rec: Recorded) -> Any:
    """Reasoning comes first when the client asks for it back (``include`` names
    ``reasoning.encrypted_content``, as Codex does with ``store: false``)."""
    what, value = _decide(turn, rec)
    output = []
    if "reasoning.encrypted_content" in (rec.body.get("include") or []):
        output.append(reasoning_item(turn.thinking or "Looking at the request."))
    output.append(text_item(value) if what == "text" else call_item(*value))
    return responses_answer(output, responses_usage(36, 87))(rec)


# -- Anthropic Messages, with thinking -------------------------------------------------------------
SIGNATURE = "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"


def _thinks(rec: Recorded) -> bool:
    return (rec.body.get("thinking") or {}).get("type") in ("enabled", "adaptive")


def anthropic_answer(blocks: list[dict[str, Any]], stop_reason: str) -> Action:
    """A Messages answer made of ``blocks`` (thinking, text, tool_use), plain or streamed
    (thinking_delta then signature_delta; tool input as input_json_delta pieces)."""
    usage = {"input_tokens": 2095, "output_tokens": 503, "cache_creation_input_tokens": 0,
             "cache_read_input_tokens": 0}

    def act(rec: Recorded) -> Any:
        message = {"id": "msg_013Zva2CMHLNnXjNJJKqJ2EF", "type": "message",
                   "role": "assistant", "model": rec.body.get("model", "claude-sonnet-4-6"),
                   "content": blocks, "stop_reason": stop_reason, "stop_sequence": None,
                   "usage": usage}
        if not rec.body.get("stream"):
            return message

        async def write(resp: web.StreamResponse, _req: web.Request) -> None:
            async def ev(name: str, data: dict[str, Any]) -> None:
                await resp.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())

            async def delta(i: int, d: dict[str, Any]) -> None:
                await ev("content_block_delta", {"type": "content_block_delta", "index": i,
                                                 "delta": d})
            await ev("message_start", {"type": "message_start", "message": {
                **message, "content": [], "stop_reason": None,
                "usage": {**usage, "output_tokens": 1}}})
            await ev("ping", {"type": "ping"})
            for i, block in enumerate(blocks):
                kind = block["type"]
                empty = {"thinking": {"type": "thinking", "thinking": "", "signature": ""},
                         "text": {"type": "text", "text": ""},
                         "tool_use": {**block, "input": {}}}[kind]
                await ev("content_block_start", {"type": "content_block_start", "index": i,
                                                 "content_block": empty})
                if kind == "thinking":
                    await delta(i, {"type": "thinking_delta", "thinking": block["thinking"]})
                    await delta(i, {"type": "signature_delta",
                                    "signature": block["signature"]})
                elif kind == "text":
                    for n, word in enumerate(block["text"].split(" ")):
                        await delta(i, {"type": "text_delta",
                                        "text": word if n == 0 else " " + word})
                else:
                    raw = json.dumps(block["input"])
                    step = max(1, len(raw) // 3)
                    for k in range(0, len(raw), step):
                        await delta(i, {"type": "input_json_delta",
                                        "partial_json": raw[k:k + step]})
                await ev("content_block_stop", {"type": "content_block_stop", "index": i})
            await ev("message_delta", {"type": "message_delta", "delta": {
                "stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]}})
            await ev("message_stop", {"type": "message_stop"})
        return write
    return act


def _messages(turn: Turn, rec: Recorded) -> Any:
    what, value = _decide(turn, rec)
    blocks: list[dict[str, Any]] = []
    if _thinks(rec):
        blocks.append({"type": "thinking", "thinking": turn.thinking or "Let me look.",
                       "signature": SIGNATURE})
    if what == "text":
        return anthropic_answer([*blocks, {"type": "text", "text": value}], "end_turn")(rec)
    name, args = value
    return anthropic_answer([*blocks, {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9",
                                       "name": name, "input": args}], "tool_use")(rec)


def _ollama(turn: Turn, rec: Recorded) -> Any:
    """A `format` schema constrains the whole answer to JSON, so no native tool call can
    come out of it: the answer is the content the schema allows. A schema that is one
    tool's parameters, or an anyOf of `{"name", "arguments"}`, is a forced call (as flowc
    forces tools); any other is the answer's own shape."""
    what, value = _decide(turn, rec)
    schema = rec.body.get("format")
    if not isinstance(schema, dict):
        return ollama_text(value)(rec) if what == "text" else ollama_tool_call(*value)(rec)
    choices = schema.get("anyOf") or []
    if what == "call" and choices and all(
            {"name", "arguments"} <= set(c.get("properties") or {}) for c in choices):
        name, args = value
        return ollama_text(json.dumps({"name": name, "arguments": args}))(rec)
    for t in rec.body.get("tools") or []:
        if (t.get("function") or {}).get("parameters") == schema:
            name = t["function"]["name"]
            args = turn.arguments if name == turn.tool else turn.final_arguments
            return ollama_text(json.dumps(args or {}))(rec)
    return ollama_text(turn.answer)(rec)


def agent(turn: Turn) -> Action:
    """One action for every wire: the scripted agent ``turn`` answering in the wire the
    request came in (an OpenAI upstream serves both chat completions and Responses)."""
    def act(rec: Recorded) -> Any:
        kind = wire(rec)
        if kind == "responses":
            return _responses(turn, rec)
        if kind == "messages":
            return _messages(turn, rec)
        if kind == "ollama":
            return _ollama(turn, rec)
        return _chat(turn, rec)
    return act


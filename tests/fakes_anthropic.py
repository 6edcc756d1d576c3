"""More loopback answers for the Messages API tests: Anthropic streams with thinking,
redacted_thinking and signature_delta blocks, usage with cache reads and writes, token
counts; chat completions carrying `reasoning_content` (as vLLM, DeepSeek and Ollama's
OpenAI endpoint send it). And a server that also records each request's raw bytes and
query string, for the verbatim forwarding tests.

Event shapes follow Anthropic's streaming reference (extended thinking: a `thinking` block
whose text comes as `thinking_delta`s and whose `signature_delta` comes just before its
`content_block_stop`; a `redacted_thinking` block arrives whole in its start event).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes import Action, FakeServer, Recorded, _sse

SIGNATURE = "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYdsXy2Wsig=="
REDACTED = ("EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpPkNRj2YfWXGmKDx"
            "H4mPnZ5sQ7vB5URj")


@dataclass
class Wire:
    path_qs: str  # the path with its query string, as the request line had it
    raw: bytes  # the body's bytes as they arrived


@dataclass
class WireServer(FakeServer):
    """A FakeServer that also keeps each request's raw body and query string."""

    wire: list[Wire] = field(default_factory=list)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.wire.append(Wire(request.path_qs, await request.read()))
        return await super()._answer(request)


def usage(input_tokens: int, output_tokens: int, cache_write: int = 0, cache_read: int = 0,
          cache_write_1h: int = 0) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "output_tokens": output_tokens,
            "cache_creation_input_tokens": cache_write, "cache_read_input_tokens": cache_read,
            "cache_creation": {"ephemeral_5m_input_tokens": cache_write - cache_write_1h,
                               "ephemeral_1h_input_tokens": cache_write_1h}}


THINKING = "The user wants the weather. I should call the tool."


def anthropic_thinking_message(**counts: int) -> dict[str, Any]:
    """A message with thinking, redacted thinking, text and a tool call."""
    return {"id": "msg_01ThinkingAndTools", "type": "message", "role": "assistant",
            "model": "claude-sonnet-4-6", "stop_reason": "tool_use", "stop_sequence": None,
            "content": [
                {"type": "thinking", "thinking": THINKING, "signature": SIGNATURE},
                {"type": "redacted_thinking", "data": REDACTED},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_01Weather", "name": "get_weather",
                 "input": {"city": "Oslo"}}],
            "usage": usage(**{"input_tokens": 50, "output_tokens": 80, **counts})}


REQUEST_ID = "req_018EeWyXxfu5pfWkrYcMdjWG"


def anthropic_message(answer: dict[str, Any]) -> Action:
    """``answer`` as it is, plain (with its `request-id` and a rate-limit header, as the API
    sends them) or streamed (each block's events)."""
    def act(rec: Recorded) -> Any:
        if rec.body.get("stream"):
            return anthropic_events(stream_events(answer))(rec)
        return web.json_response(answer, headers={
            "request-id": REQUEST_ID, "anthropic-ratelimit-requests-remaining": "49"})
    return act


def stream_events(msg: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The event sequence that streams ``msg``: `message_start` with the input usage,
    each block's start, deltas and stop, `message_delta` with the cumulative usage."""
    u = msg["usage"]
    start_usage = {**u, "output_tokens": 1}
    events: list[tuple[str, dict[str, Any]]] = [("message_start", {
        "type": "message_start", "message": {**msg, "content": [], "stop_reason": None,
                                             "usage": start_usage}}),
        ("ping", {"type": "ping"})]
    for i, block in enumerate(msg["content"]):
        kind = block["type"]
        start = {"thinking": {"type": "thinking", "thinking": "", "signature": ""},
                 "text": {"type": "text", "text": ""},
                 "tool_use": {**block, "input": {}}}.get(kind, block)
        events.append(("content_block_start", {"type": "content_block_start", "index": i,
                                               "content_block": start}))
        deltas: list[dict[str, Any]] = []
        if kind == "thinking":
            half = len(block["thinking"]) // 2
            deltas = [{"type": "thinking_delta", "thinking": block["thinking"][:half]},
                      {"type": "thinking_delta", "thinking": block["thinking"][half:]},
                      {"type": "signature_delta", "signature": block["signature"]}]
        elif kind == "text":
            deltas = [{"type": "text_delta", "text": w} for w in
                      block["text"].split(" ") if w]
        elif kind == "tool_use":
            raw = json.dumps(block["input"])
            deltas = [{"type": "input_json_delta", "partial_json": ""},
                      {"type": "input_json_delta", "partial_json": raw[:5]},
                      {"type": "input_json_delta", "partial_json": raw[5:]}]
        for d in deltas:
            events.append(("content_block_delta", {"type": "content_block_delta",
                                                   "index": i, "delta": d}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    events.append(("message_delta", {
        "type": "message_delta",
        "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": None},
        "usage": {"input_tokens": u["input_tokens"], "output_tokens": u["output_tokens"],
                  "cache_creation_input_tokens": u["cache_creation_input_tokens"],
                  "cache_read_input_tokens": u["cache_read_input_tokens"]}}))
    events.append(("message_stop", {"type": "message_stop"}))
    return events


def sse_bytes(events: list[tuple[str, dict[str, Any]]]) -> list[bytes]:
    return [f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events]


def anthropic_events(events: list[tuple[str, dict[str, Any]]]) -> Action:
    """Exactly these events, as a stream."""
    def act(rec: Recorded) -> Any:
        async def write(resp: web.StreamResponse, _req: web.Request) -> None:
            for chunk in sse_bytes(events):
                await resp.write(chunk)
        return write
    return act


def anthropic_error(status: int, etype: str, message: str) -> Action:
    """An error as Anthropic sends it, with its request id."""
    def act(rec: Recorded) -> Any:
        return web.json_response({"type": "error", "error": {"type": etype, "message": message},
                                  "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"}, status=status)
    return act


def anthropic_count(input_tokens: int) -> Action:
    def act(rec: Recorded) -> Any:
        return {"input_tokens": input_tokens}
    return act


# -- chat completions with reasoning -------------------------------------------------------------
def openai_reasoning(text: str, reasoning: str, *, prompt_tokens: int = 30,
                     completion_tokens: int = 40, reasoning_tokens: int = 25,
                     model: str = "o4-mini-2025-04-16") -> Action:
    """An answer whose reasoning comes as `reasoning_content` on the message (plain) or on
    the deltas (streamed), ahead of the text."""
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens,
         "prompt_tokens_details": {"cached_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": reasoning_tokens}}

    def act(rec: Recorded) -> Any:
        if not rec.body.get("stream"):
            return {"id": "chatcmpl-R3as0n1ng", "object": "chat.completion",
                    "created": 1741569952, "model": model,
                    "choices": [{"index": 0, "message": {
                        "role": "assistant", "content": text, "reasoning_content": reasoning,
                        "refusal": None}, "logprobs": None, "finish_reason": "stop"}],
                    "usage": u}

        async def write(resp: web.StreamResponse, _req: web.Request) -> None:
            base = {"id": "chatcmpl-R3as0n1ng", "object": "chat.completion.chunk",
                    "created": 1741569952, "model": model}

            def delta(d: dict[str, Any], finish: str | None = None) -> bytes:
                return _sse({**base, "choices": [{"index": 0, "delta": d, "logprobs": None,
                                                  "finish_reason": finish}]})
            await resp.write(delta({"role": "assistant", "content": ""}))
            for piece in reasoning.split(" "):
                await resp.write(delta({"reasoning_content": piece + " "}))
            for piece in text.split(" "):
                await resp.write(delta({"content": piece + " "}))
            await resp.write(delta({}, "stop"))
            if (rec.body.get("stream_options") or {}).get("include_usage"):
                await resp.write(_sse({**base, "choices": [], "usage": u}))
            await resp.write(b"data: [DONE]\n\n")
        return write
    return act

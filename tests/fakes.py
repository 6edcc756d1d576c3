"""Loopback servers that speak each provider's wire format as its API reference documents it.

Each server records every request (path, headers, JSON body) for the test to check, and
answers from a script: a queue of actions, falling back to a default answer. Response bodies
follow the examples in the providers' API references (OpenAI Chat Completions, Anthropic
Messages, Ollama /api/chat), including their streaming event sequences.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Action = Callable[["Recorded"], Any]


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FakeServer:
    kind: str
    requests: list[Recorded] = field(default_factory=list)
    script: deque[Action] = field(default_factory=deque)
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _handling: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def then(self, *actions: Action) -> FakeServer:
        self.script.extend(actions)
        return self

    def start(self) -> FakeServer:
        self.port = free_port()
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            self._loop.run_until_complete(site.start())
            ready.set()
            self._loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        ready.wait(5)
        return self

    def stop(self) -> None:
        if self._loop and self._runner:
            for task in list(self._handling):  # hanging answers end with the server
                self._loop.call_soon_threadsafe(task.cancel)
            fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
            fut.result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._handling.add(task)
        try:
            return await self._answer(request)
        finally:
            self._handling.discard(task)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {"_raw": raw.decode(errors="replace")}
        rec = Recorded(request.path, {k.lower(): v for k, v in request.headers.items()}, body)
        self.requests.append(rec)
        action = self.script.popleft() if self.script else DEFAULTS[self.kind]
        result = action(rec)
        if asyncio.iscoroutine(result):
            result = await result
        if isinstance(result, web.StreamResponse):
            return result
        if callable(result):  # a streaming writer
            resp = web.StreamResponse(headers={"content-type": _STREAM_TYPE[self.kind]})
            await resp.prepare(request)
            await result(resp, request)
            return resp
        return web.json_response(result)


_STREAM_TYPE = {"openai": "text/event-stream", "anthropic": "text/event-stream",
                "ollama": "application/x-ndjson"}


def _last_user_text(body: dict[str, Any]) -> str:
    for msg in reversed(body.get("messages") or []):
        if msg.get("role") == "user":
            c = msg.get("content")
            if isinstance(c, str):
                return c
            return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return ""


# -- OpenAI ------------------------------------------------------------------------------------
def openai_text(text: str | None = None, *, prompt_tokens: int = 19, completion_tokens: int = 10,
                cached: int = 0, model: str = "gpt-4o-mini-2024-07-18") -> Action:
    def act(rec: Recorded) -> Any:
        if rec.body.get("stream"):
            return openai_stream_text(text or "Hello! How can I help?", prompt_tokens,
                                      completion_tokens, model)(rec)
        return {
            "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT", "object": "chat.completion",
            "created": 1741569952, "model": model,
            "choices": [{"index": 0, "message": {
                "role": "assistant", "content": text or f"echo: {_last_user_text(rec.body)}",
                "refusal": None, "annotations": []}, "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
                      "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                    "accepted_prediction_tokens": 0,
                                                    "rejected_prediction_tokens": 0}},
            "service_tier": "default", "system_fingerprint": "fp_44709d6fcb"}
    return act


def _sse(data: Any) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode()) + b"\n\n"


def openai_stream_text(text: str, prompt_tokens: int = 19, completion_tokens: int = 10,
                       model: str = "gpt-4o-mini-2024-07-18", *, usage: bool = True
                       ) -> Action:
    """``usage=False``: a server that leaves the usage chunk out even when asked."""
    def act(rec: Recorded) -> Any:
        async def write(resp: web.StreamResponse, _req: web.Request) -> None:
            base = {"id": "chatcmpl-123", "object": "chat.completion.chunk",
                    "created": 1694268190, "model": model,
                    "system_fingerprint": "fp_44709d6fcb"}
            await resp.write(_sse({**base, "choices": [{"index": 0, "delta": {
                "role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}]}))
            for word in text.split(" "):
                await resp.write(_sse({**base, "choices": [{"index": 0, "delta": {
                    "content": word + " "}, "logprobs": None, "finish_reason": None}]}))
            await resp.write(_sse({**base, "choices": [{"index": 0, "delta": {},
                                                        "logprobs": None,
                                                        "finish_reason": "stop"}]}))
            if usage and (rec.body.get("stream_options") or {}).get("include_usage"):
                await resp.write(_sse({**base, "choices": [], "usage": {
                    "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}}))
            await resp.write(b"data: [DONE]\n\n")
        return write
    return act


def openai_tool_call(name: str, arguments: dict[str, Any], call_id: str = "call_abc123"
                     ) -> Action:
    def act(rec: Recorded) -> Any:
        return {
            "id": "chatcmpl-abc123", "object": "chat.completion", "created": 1699896916,
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"index": 0, "message": {
                "role": "assistant", "content": None, "tool_calls": [{
                    "id": call_id, "type": "function",
                    "function": {"name": name, "arguments": json.dumps(arguments)}}]},
                "logprobs": None, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 82, "completion_tokens": 17, "total_tokens": 99}}
    return act


def http_error(status: int, message: str, *, retry_after: str | None = None,
               kind: str = "openai") -> Action:
    def act(rec: Recorded) -> Any:
        if kind == "anthropic":
            etype = {429: "rate_limit_error", 529: "overloaded_error", 400:
                     "invalid_request_error"}.get(status, "api_error")
            body = {"type": "error", "error": {"type": etype, "message": message}}
        elif kind == "ollama":
            body = {"error": message}
        else:
            body = {"error": {"message": message, "type": "requests" if status == 429 else
                              "server_error", "param": None, "code": None}}
        headers = {"retry-after": retry_after} if retry_after else None
        return web.json_response(body, status=status, headers=headers)
    return act


def slow(seconds: float, then: Action) -> Action:
    async def act(rec: Recorded) -> Any:
        await asyncio.sleep(seconds)
        return then(rec)
    return act


def malformed() -> Action:
    def act(rec: Recorded) -> Any:
        return web.Response(text="{not json", content_type="application/json")
    return act


def dropped() -> Action:
    """Accept the request, then close the connection without an answer."""
    async def act(rec: Recorded) -> Any:
        raise ConnectionResetError  # aiohttp closes the transport
    return act


# -- faults ------------------------------------------------------------------------------------
# Upstreams that misbehave, for every wire format: no answer, a connection reset in the
# middle of the body, bytes that are not JSON, JSON of the wrong shape, streams that end
# early or carry no event at all, and bodies that echo the request's credentials.
def hang(seconds: float = 10.0) -> Action:
    """Accept the request and send nothing (then drop the connection after ``seconds``)."""
    async def act(rec: Recorded) -> Any:
        await asyncio.sleep(seconds)
        raise ConnectionResetError
    return act


def raw_body(body: bytes, *, status: int = 200, content_type: str = "application/json"
             ) -> Action:
    def act(rec: Recorded) -> Any:
        return web.Response(body=body, status=status, content_type=content_type)
    return act


def json_body(value: Any, *, status: int = 200) -> Action:
    """Any JSON value as the answer (a list, an object of the wrong shape, ...)."""
    return raw_body(json.dumps(value).encode(), status=status)


def garbage() -> Action:
    """A 200 whose body is bytes that are neither JSON nor UTF-8."""
    return raw_body(bytes(range(256)) * 2, content_type="application/octet-stream")


class _Cut(Exception):
    pass


class _Writes:
    """A stream response that lets ``limit`` writes through, then raises `_Cut`."""

    def __init__(self, resp: web.StreamResponse, limit: int) -> None:
        self.resp, self.limit, self.count = resp, limit, 0

    async def write(self, data: bytes) -> None:
        if self.count >= self.limit:
            raise _Cut
        self.count += 1
        await self.resp.write(data)


def cut(action: Action, after: int, how: str = "reset", seconds: float = 10.0) -> Action:
    """``action``'s answer, cut after ``after`` writes (stream events, or for a plain answer
    half its body): ``reset`` drops the connection mid-body, ``end`` ends the body cleanly
    there (a truncated stream; ``after=0``: a 200 with no events), ``stall`` goes silent
    for ``seconds`` and then drops it."""
    def act(rec: Recorded) -> Any:
        result = action(rec)
        if isinstance(result, web.StreamResponse):
            raise TypeError("cut() needs an answer body or a stream writer")
        if not callable(result):  # a plain answer: send the first half of its JSON
            body = json.dumps(result).encode()

            async def plain(resp: web.StreamResponse, _req: web.Request) -> None:
                await resp.write(body[:len(body) // 2])
            writer = plain
        else:
            writer = result

        async def write(resp: web.StreamResponse, request: web.Request) -> None:
            try:
                await writer(_Writes(resp, after), request)  # type: ignore[arg-type]
                if after == 0 or not callable(result):
                    raise _Cut
            except _Cut:
                if how == "end":
                    return
                if how == "stall":
                    await asyncio.sleep(seconds)
                if request.transport is not None:
                    request.transport.close()
        return write
    return act


def empty_stream() -> Action:
    """A 200 stream with no events at all."""
    def act(rec: Recorded) -> Any:
        async def write(resp: web.StreamResponse, _req: web.Request) -> None:
            return None
        return write
    return act


def credential(rec: Recorded) -> str:
    """The credential header the request carried, as an echoing server would show it."""
    if "authorization" in rec.headers:
        return "Authorization: " + rec.headers["authorization"]
    return "x-api-key: " + rec.headers.get("x-api-key", "")


def echo_key(kind: str, where: str) -> Action:
    """An upstream (``kind``: its wire format, openai for any other name) that echoes the
    request's credentials: ``text`` a 200 body that is not
    JSON, ``error`` a 401 in the provider's error shape, ``sse`` a stream whose first event
    is not JSON, ``stream_error`` a stream whose error event quotes it, ``content`` a valid
    answer whose text does."""
    def act(rec: Recorded) -> Any:
        echoed = credential(rec)
        if where == "text":
            return web.Response(text=f"<html>bad gateway; you sent {echoed}</html>")
        if where == "error":
            return http_error(401, f"Incorrect API key provided: {echoed}", kind=kind)(rec)
        if where == "content":
            return {"anthropic": anthropic_text, "ollama": ollama_text}.get(
                kind, openai_text)(f"you sent {echoed}")(rec)

        async def write(resp: web.StreamResponse, _req: web.Request) -> None:
            if where == "sse":
                await resp.write(f"data: you sent {echoed}\n\n".encode())
            elif kind == "anthropic":
                await resp.write(b"event: error\ndata: " + json.dumps({
                    "type": "error", "error": {"type": "overloaded_error",
                                               "message": f"you sent {echoed}"}}).encode()
                    + b"\n\n")
            elif kind == "ollama":
                await resp.write(json.dumps({"error": f"you sent {echoed}"}).encode() + b"\n")
            else:
                await resp.write(_sse({"error": {"message": f"you sent {echoed}",
                                                 "type": "server_error"}}))
        return write
    return act


# -- Anthropic ---------------------------------------------------------------------------------
def anthropic_text(text: str = "Hi! My name is Claude.", *, input_tokens: int = 2095,
                   output_tokens: int = 503, cache_write: int = 0, cache_read: int = 0,
                   cache_write_1h: int = 0, model: str = "claude-sonnet-4-6") -> Action:
    """`cache_write` counts every cache write; `cache_write_1h` says how many were for an
    hour (the API splits them in `usage.cache_creation`)."""
    def act(rec: Recorded) -> Any:
        if rec.body.get("stream"):
            return anthropic_stream([("text", text)], input_tokens=input_tokens,
                                    output_tokens=output_tokens, model=model)(rec)
        return {"id": "msg_013Zva2CMHLNnXjNJJKqJ2EF", "type": "message", "role": "assistant",
                "model": model, "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                          "cache_creation_input_tokens": cache_write,
                          "cache_read_input_tokens": cache_read,
                          "cache_creation": {
                              "ephemeral_5m_input_tokens": cache_write - cache_write_1h,
                              "ephemeral_1h_input_tokens": cache_write_1h}}}
    return act


def anthropic_tool_use(name: str, tool_input: dict[str, Any],
                       tool_id: str = "toolu_01A09q90qw90lq917835lq9") -> Action:
    def act(rec: Recorded) -> Any:
        if rec.body.get("stream"):
            return anthropic_stream([("tool_use", (tool_id, name, tool_input))],
                                    stop_reason="tool_use")(rec)
        return {"id": "msg_01Aq9w938a90dw8q", "type": "message", "role": "assistant",
                "model": "claude-sonnet-4-6",
                "content": [{"type": "text", "text": "I'll check that for you."},
                            {"type": "tool_use", "id": tool_id, "name": name,
                             "input": tool_input}],
                "stop_reason": "tool_use", "stop_sequence": None,
                "usage": {"input_tokens": 472, "output_tokens": 89,
                          "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}
    return act


def anthropic_stream(blocks: list[tuple[str, Any]], *, input_tokens: int = 25,
                     output_tokens: int = 15, stop_reason: str = "end_turn",
                     model: str = "claude-sonnet-4-6") -> Action:
    """Blocks are ("text", str) or ("tool_use", (id, name, input)); tool inputs stream as
    several input_json_delta pieces, as the API sends them."""
    def act(rec: Recorded) -> Any:
        async def write(resp: web.StreamResponse, _req: web.Request) -> None:
            async def ev(name: str, data: dict[str, Any]) -> None:
                await resp.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
            await ev("message_start", {"type": "message_start", "message": {
                "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY", "type": "message",
                "role": "assistant", "content": [], "model": model, "stop_reason": None,
                "stop_sequence": None, "usage": {"input_tokens": input_tokens,
                                                 "output_tokens": 1}}})
            await ev("ping", {"type": "ping"})
            for i, (kind, value) in enumerate(blocks):
                if kind == "text":
                    await ev("content_block_start", {"type": "content_block_start",
                                                     "index": i, "content_block": {
                                                         "type": "text", "text": ""}})
                    for piece in value.split(" "):
                        await ev("content_block_delta", {"type": "content_block_delta",
                                                         "index": i, "delta": {
                                                             "type": "text_delta",
                                                             "text": piece + " "}})
                else:
                    tid, name, tool_input = value
                    await ev("content_block_start", {"type": "content_block_start",
                                                     "index": i, "content_block": {
                                                         "type": "tool_use", "id": tid,
                                                         "name": name, "input": {}}})
                    raw = json.dumps(tool_input)
                    await ev("content_block_delta", {"type": "content_block_delta",
                                                     "index": i, "delta": {
                                                         "type": "input_json_delta",
                                                         "partial_json": ""}})
                    step = max(1, len(raw) // 3)
                    for k in range(0, len(raw), step):
                        await ev("content_block_delta", {"type": "content_block_delta",
                                                         "index": i, "delta": {
                                                             "type": "input_json_delta",
                                                             "partial_json": raw[k:k + step]}})
                await ev("content_block_stop", {"type": "content_block_stop", "index": i})
            await ev("message_delta", {"type": "message_delta", "delta": {
                "stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": output_tokens}})
            await ev("message_stop", {"type": "message_stop"})
        return write
    return act


# -- Ollama ------------------------------------------------------------------------------------
def ollama_text(text: str = "The sky is blue because of Rayleigh scattering.",
                prompt_eval_count: int = 26, eval_count: int = 282) -> Action:
    def act(rec: Recorded) -> Any:
        model = rec.body.get("model", "llama3.2")
        if rec.body.get("stream", True):
            async def write(resp: web.StreamResponse, _req: web.Request) -> None:
                for word in text.split(" "):
                    await resp.write(json.dumps({
                        "model": model, "created_at": "2023-08-04T08:52:19.385406455-07:00",
                        "message": {"role": "assistant", "content": word + " "},
                        "done": False}).encode() + b"\n")
                await resp.write(json.dumps({
                    "model": model, "created_at": "2023-08-04T19:22:45.499127Z",
                    "message": {"role": "assistant", "content": ""}, "done": True,
                    "done_reason": "stop", "total_duration": 4883583458,
                    "load_duration": 1334875, "prompt_eval_count": prompt_eval_count,
                    "prompt_eval_duration": 342546000, "eval_count": eval_count,
                    "eval_duration": 4535599000}).encode() + b"\n")
            return write
        return {"model": model, "created_at": "2023-12-12T14:13:43.416799Z",
                "message": {"role": "assistant", "content": text}, "done": True,
                "done_reason": "stop", "total_duration": 5191566416, "load_duration": 2154458,
                "prompt_eval_count": prompt_eval_count, "prompt_eval_duration": 383809000,
                "eval_count": eval_count, "eval_duration": 4799921000}
    return act


def ollama_tool_call(name: str, arguments: dict[str, Any]) -> Action:
    def act(rec: Recorded) -> Any:
        message = {"role": "assistant", "content": "",
                   "tool_calls": [{"function": {"name": name, "arguments": arguments}}]}
        final = {"model": rec.body.get("model"), "created_at": "2024-07-22T20:33:28.123Z",
                 "message": message, "done_reason": "stop", "done": True,
                 "total_duration": 885095291, "load_duration": 3753500,
                 "prompt_eval_count": 122, "prompt_eval_duration": 328493000,
                 "eval_count": 33, "eval_duration": 552222000}
        if rec.body.get("stream", True):
            async def write(resp: web.StreamResponse, _req: web.Request) -> None:
                await resp.write(json.dumps({**final, "done": False, "done_reason": None}
                                            ).encode() + b"\n")
                await resp.write(json.dumps({**final, "message": {
                    "role": "assistant", "content": ""}}).encode() + b"\n")
            return write
        return final
    return act


DEFAULTS: dict[str, Action] = {
    "openai": openai_text(),
    "anthropic": anthropic_text(),
    "ollama": ollama_text(),
}


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError("condition not met in time")

"""Loopback answers of OpenAI's Responses API (`POST /v1/responses`), plain and streamed.

The Response object and the streamed event sequence follow OpenAI's API reference: a stream
opens with `response.created` and `response.in_progress`; each output item comes as
`response.output_item.added`, its parts (`response.content_part.added`, the
`response.output_text.delta`s, `response.output_text.done`, `response.content_part.done`;
for a function call the `response.function_call_arguments.delta`s and `.done`; for a
reasoning item its summary part and `response.reasoning_summary_text.delta`s), then
`response.output_item.done`; it ends with `response.completed` carrying the usage, with
`input_tokens_details.cached_tokens` and `output_tokens_details.reasoning_tokens`. Every
event has its `sequence_number`.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from tests.fakes import Action, Recorded

RESPONSE_ID = "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b"
MODEL = "gpt-4o-mini-2024-07-18"
ENCRYPTED = "gAAAAABo-encrypted-reasoning-blob=="


def text_item(text: str) -> dict[str, Any]:
    return {"id": "msg_67ccd2bf17f0819081ff3bb2cf6508e60bb6a6b452d3795b", "type": "message",
            "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [],
                         "logprobs": []}]}


def call_item(name: str, arguments: dict[str, Any], call_id: str = "call_12345xyz"
              ) -> dict[str, Any]:
    return {"id": "fc_12345xyz", "type": "function_call", "status": "completed",
            "call_id": call_id, "name": name, "arguments": json.dumps(arguments)}


def reasoning_item(summary: str) -> dict[str, Any]:
    return {"id": "rs_6876cf02e0bc8192b74af0fb64b715ff", "type": "reasoning",
            "summary": [{"type": "summary_text", "text": summary}],
            "encrypted_content": ENCRYPTED}


def usage(input_tokens: int, output_tokens: int, cached: int = 0, reasoning: int = 0
          ) -> dict[str, Any]:
    return {"input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": input_tokens + output_tokens}


def response(rec: Recorded, status: str, output: list[dict[str, Any]],
             used: dict[str, Any] | None) -> dict[str, Any]:
    body = rec.body
    return {"id": RESPONSE_ID, "object": "response", "created_at": 1741476542,
            "status": status, "background": False, "error": None,
            "incomplete_details": None, "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"), "model": MODEL,
            "output": output, "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "store": body.get("store", True), "temperature": 1.0,
            "text": {"format": {"type": "text"}}, "tool_choice": body.get("tool_choice",
                                                                          "auto"),
            "tools": body.get("tools") or [], "top_p": 1.0, "truncation": "disabled",
            "usage": used, "user": None, "metadata": {}}


def item_events(item: dict[str, Any], index: int) -> list[tuple[str, dict[str, Any]]]:
    """The events that stream one output item (without sequence numbers)."""
    iid = item["id"]
    out: list[tuple[str, dict[str, Any]]] = []
    if item["type"] == "message":
        out.append(("response.output_item.added", {"output_index": index, "item": {
            **item, "status": "in_progress", "content": []}}))
        for c, part in enumerate(item["content"]):
            empty = {**part, "text": ""}
            out.append(("response.content_part.added", {
                "item_id": iid, "output_index": index, "content_index": c, "part": empty}))
            words = part["text"].split(" ")
            for w, word in enumerate(words):
                out.append(("response.output_text.delta", {
                    "item_id": iid, "output_index": index, "content_index": c,
                    "delta": word + (" " if w < len(words) - 1 else ""), "logprobs": []}))
            out.append(("response.output_text.done", {
                "item_id": iid, "output_index": index, "content_index": c,
                "text": part["text"], "logprobs": []}))
            out.append(("response.content_part.done", {
                "item_id": iid, "output_index": index, "content_index": c, "part": part}))
    elif item["type"] == "function_call":
        out.append(("response.output_item.added", {"output_index": index, "item": {
            **item, "status": "in_progress", "arguments": ""}}))
        args = item["arguments"]
        step = max(1, len(args) // 3)
        for k in range(0, len(args), step):
            out.append(("response.function_call_arguments.delta", {
                "item_id": iid, "output_index": index, "delta": args[k:k + step]}))
        out.append(("response.function_call_arguments.done", {
            "item_id": iid, "output_index": index, "arguments": args}))
    else:  # reasoning
        out.append(("response.output_item.added", {"output_index": index, "item": {
            **item, "summary": []}}))
        for s, part in enumerate(item["summary"]):
            out.append(("response.reasoning_summary_part.added", {
                "item_id": iid, "output_index": index, "summary_index": s,
                "part": {"type": "summary_text", "text": ""}}))
            out.append(("response.reasoning_summary_text.delta", {
                "item_id": iid, "output_index": index, "summary_index": s,
                "delta": part["text"]}))
            out.append(("response.reasoning_summary_text.done", {
                "item_id": iid, "output_index": index, "summary_index": s,
                "text": part["text"]}))
            out.append(("response.reasoning_summary_part.done", {
                "item_id": iid, "output_index": index, "summary_index": s, "part": part}))
    out.append(("response.output_item.done", {"output_index": index, "item": item}))
    return out


def stream_events(rec: Recorded, output: list[dict[str, Any]], used: dict[str, Any],
                  final: str = "response.completed") -> list[tuple[str, dict[str, Any]]]:
    """The whole event sequence of one answer, numbered."""
    start = response(rec, "in_progress", [], None)
    events = [("response.created", {"response": start}),
              ("response.in_progress", {"response": start})]
    for i, item in enumerate(output):
        events += item_events(item, i)
    status = {"response.completed": "completed", "response.failed": "failed",
              "response.incomplete": "incomplete"}[final]
    end = response(rec, status, output, used)
    if final == "response.failed":
        end["error"] = {"code": "server_error", "message": "The model failed to answer."}
    events.append((final, {"response": end}))
    return [(name, {"type": name, **data, "sequence_number": n})
            for n, (name, data) in enumerate(events)]


def sse_bytes(events: list[tuple[str, dict[str, Any]]]) -> bytes:
    return b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
                    for name, data in events)


# The request id and a rate-limit header, as OpenAI sends them with every answer.
HEADERS = {"x-request-id": "req_b5e4f1e7a8c9d0", "x-ratelimit-remaining-requests": "499"}


def responses_answer(output: list[dict[str, Any]], used: dict[str, Any], *,
                     final: str = "response.completed", cut_after: int | None = None
                     ) -> Action:
    """``output`` as a Response object, or streamed when the request asks: ``final`` the
    last event's type; ``cut_after`` ends the stream after that many events, cleanly, as a
    dropped stream looks to the reader."""
    def act(rec: Recorded) -> Any:
        if not rec.body.get("stream"):
            return web.json_response(response(rec, "completed", output, used),
                                     headers=HEADERS)
        events = stream_events(rec, output, used, final)
        if cut_after is None:  # whole, so it can carry OpenAI's headers
            return web.Response(body=sse_bytes(events), content_type="text/event-stream",
                                headers=HEADERS)
        events = events[:cut_after]

        async def write(resp: web.StreamResponse, _req: web.Request) -> None:
            for event in events:
                await resp.write(sse_bytes([event]))
        return write
    return act


def responses_text(text: str = "Hello! How can I help?", **counts: int) -> Action:
    return responses_answer([text_item(text)], usage(**{"input_tokens": 36,
                                                        "output_tokens": 87, **counts}))


def responses_reasoned_call(name: str, arguments: dict[str, Any], summary: str,
                            **counts: int) -> Action:
    """A reasoning item (summary and encrypted content) then a function call."""
    return responses_answer([reasoning_item(summary), call_item(name, arguments)],
                            usage(**{"input_tokens": 291, "output_tokens": 23,
                                     "cached": 128, "reasoning": 11, **counts}))

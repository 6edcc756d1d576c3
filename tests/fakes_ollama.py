"""More of Ollama's wire for the loopback servers of tests/fakes.py: answers constrained by
`format` (a forced tool's arguments), several tool calls, thinking models, and `/api/embed`;
and OpenAI's `/v1/embeddings`. Bodies and streams follow the API references (Ollama's
docs/api.md and capabilities/thinking; OpenAI's embeddings reference): one JSON object per
line for Ollama's streams, the counts only on the final `done` line."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
from typing import Any

from aiohttp import web

from tests.fakes import Action, Recorded

CREATED = "2024-12-06T00:46:58.265747Z"


def _line(value: dict[str, Any]) -> bytes:
    return json.dumps(value).encode() + b"\n"


def _final(model: str, eval_count: int, prompt_eval_count: int, done_reason: str
           ) -> dict[str, Any]:
    return {"model": model, "created_at": CREATED,
            "message": {"role": "assistant", "content": ""}, "done_reason": done_reason,
            "done": True, "total_duration": 2254970291, "load_duration": 574751416,
            "prompt_eval_count": prompt_eval_count, "prompt_eval_duration": 1502000000,
            "eval_count": eval_count, "eval_duration": 175000000}


def ollama_answer(content: str = "", *, thinking: str = "",
                  tool_calls: list[tuple[str, dict[str, Any]]] | None = None,
                  prompt_eval_count: int = 34, eval_count: int = 12,
                  done_reason: str = "stop", pieces: int = 4) -> Action:
    """An `/api/chat` answer: ``thinking`` (a thinking model's trace, `message.thinking`),
    then ``content`` (the text, or the JSON a `format` schema constrained it to), then
    ``tool_calls`` (native calls, arguments as objects). Streamed, the thinking and the
    content come in about ``pieces`` lines each, the calls on one line, then the final
    line with the counts."""
    calls = [{"function": {"name": n, "arguments": a}} for n, a in tool_calls or ()]

    def split(text: str) -> list[str]:
        if not text:
            return []
        step = max(1, math.ceil(len(text) / pieces))
        return [text[i:i + step] for i in range(0, len(text), step)]

    def act(rec: Recorded) -> Any:
        model = rec.body.get("model", "llama3.2")
        final = _final(model, eval_count, prompt_eval_count, done_reason)
        if not rec.body.get("stream", True):
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            return {**final, "message": message}

        async def write(resp: web.StreamResponse, _req: web.Request) -> None:
            def part(**message: Any) -> bytes:
                return _line({"model": model, "created_at": CREATED,
                              "message": {"role": "assistant", "content": "", **message},
                              "done": False})
            for piece in split(thinking):
                await resp.write(part(thinking=piece))
            for piece in split(content):
                await resp.write(part(content=piece))
            if calls:
                await resp.write(part(tool_calls=calls))
            await resp.write(_line(final))
        return write
    return act


def ollama_json(value: Any, **kw: Any) -> Action:
    """The answer a `format` schema constrains the model to: the JSON text as content (as
    Ollama's structured-output example answers, `"content": "{\\"age\\": 22, ...}"`)."""
    return ollama_answer(json.dumps(value), **kw)


# -- embeddings ------------------------------------------------------------------------------------
def vector_of(text: str, dims: int = 8) -> list[float]:
    """A deterministic unit vector for ``text`` (Ollama's /api/embed answers L2-normalised
    vectors), exactly representable in float32 after rounding below."""
    raw = [((hash_bytes(text) >> (i * 8)) & 0xFF) - 127.5 for i in range(dims)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [struct.unpack("<f", struct.pack("<f", v / norm))[0] for v in raw]


def hash_bytes(text: str) -> int:
    # Python's hash() is salted per process: the fake and the test must agree.
    return int.from_bytes(hashlib.sha256(text.encode()).digest(), "little")


def ollama_embed(*, prompt_eval_count: int | None = 8, dims: int = 8,
                 count: int | None = None) -> Action:
    """`/api/embed`: one vector per input (``count`` vectors, to answer wrongly), with
    `total_duration`, `load_duration` and `prompt_eval_count`; ``prompt_eval_count=None``
    leaves the counts out, as the reference's batch example shows."""
    def act(rec: Recorded) -> Any:
        value = rec.body.get("input")
        texts = [value] if isinstance(value, str) else list(value or [])
        width = rec.body.get("dimensions") or dims
        vectors = [vector_of(t, width) for t in texts]
        if count is not None:
            vectors = vectors[:count]
        out: dict[str, Any] = {"model": rec.body.get("model"), "embeddings": vectors}
        if prompt_eval_count is not None:
            out.update(total_duration=14143917, load_duration=1019500,
                       prompt_eval_count=prompt_eval_count)
        return out
    return act


def openai_embeddings(*, prompt_tokens: int = 8, dims: int = 8,
                      model: str = "text-embedding-3-small") -> Action:
    """OpenAI's `/v1/embeddings`: a list of `embedding` objects, base64 when asked (the
    float32 values' little-endian bytes), and usage."""
    def act(rec: Recorded) -> Any:
        value = rec.body.get("input")
        texts = [value] if isinstance(value, str) else list(value or [])
        b64 = rec.body.get("encoding_format") == "base64"
        data = []
        for i, t in enumerate(texts):
            vec = vector_of(str(t), rec.body.get("dimensions") or dims)
            data.append({"object": "embedding", "index": i, "embedding": base64.b64encode(
                struct.pack(f"<{len(vec)}f", *vec)).decode() if b64 else vec})
        return {"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
    return act

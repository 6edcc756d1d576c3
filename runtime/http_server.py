"""How `flowc serve` (and each `--workers` worker) runs uvicorn.

uvicorn writes a response's head and its body with two `send(2)` calls, so a client gets
two TCP segments for every answer and, waiting for the body, wakes up twice. On loopback
that second segment cost about 30 us of added latency a request at c=1 and a share of the
cores at c=32 (docs/benchmarks.md). `CoalescingProtocol` gives uvicorn's httptools protocol
a transport whose writes within one event-loop iteration leave as one `send(2)`: the head
and a whole body go out together; a stream's events still leave as soon as each is sent
(the flush runs before the loop next waits for I/O).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Past this many bytes buffered in one iteration, writes go through at once: a large body
# sent in a tight loop (an export) is then bounded, and meets the transport's own flow
# control (uvicorn pauses a response whose socket is not keeping up).
_FLUSH_AT = 64 * 1024


class CoalescingTransport:
    """``transport`` with the writes of one loop iteration sent as one. Everything else
    (flow control, extra info, closing) is the wrapped transport's; closing sends what is
    buffered first."""

    __slots__ = ("_buffer", "_loop", "_size", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._buffer: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._buffer:
            self._loop.call_soon(self.flush)
        self._buffer.append(data)
        self._size += len(data)
        if self._size >= _FLUSH_AT:
            self.flush()

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        buffer = self._buffer
        if not buffer:
            return
        self._buffer, self._size = [], 0
        if self._transport.is_closing():
            return
        self._transport.write(buffer[0] if len(buffer) == 1 else b"".join(buffer))

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._size

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._buffer, self._size = [], 0
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a `CoalescingTransport`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(
            CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]


def uvicorn_options() -> dict[str, Any]:
    """The uvicorn settings flowc serves with, one process or many."""
    # No `server: uvicorn` header: it names the software to whoever asks, and costs every
    # response a header.
    return {"loop": "uvloop", "http": CoalescingProtocol, "timeout_graceful_shutdown": 10,
            "access_log": False, "server_header": False}

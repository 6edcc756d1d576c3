"""How `flowc serve` (and each `--workers` worker) runs uvicorn.

uvicorn writes a response's head and its body with two `send(2)` calls, so a client gets
two TCP segments for every answer and, waiting for the body, wakes up twice. On loopback
that second segment cost about 30 us of added latency a request at c=1 and a share of the
cores at c=32 (docs/benchmarks.md). `CoalescingProtocol` gives uvicorn's httptools protocol
a transport whose writes within one event-loop iteration leave as one `send(2)`: the head
and a whole body go out together; a stream's events still leave as soon as each is sent
(the flush runs before the loop next waits for I/O).

`respond` sends a gateway answer whose head it writes itself, the way uvicorn would, in a
few calls into C: uvicorn's own loop over the headers (two regular-expression searches, a
lower-casing and four appends each) cost ~0.45 us a header, and an answer has 9 headers, a
rate-limited key's 6 more (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

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


async def respond(send: Any, status: int, headers: list[tuple[bytes, bytes]],
                  body: bytes, lines: bytes = b"") -> None:
    """Send a whole response on ASGI ``send``, its content-length from ``body`` (``headers``
    must not have one). ``lines``: more headers, as lines of the head that flowc formats
    itself (names and values it vouches for: a rate limit's counts). When ``send`` is
    uvicorn's own, the head is written here; otherwise (a wrapped ``send``, another
    server, a head `_write_head` leaves to uvicorn) it goes as the ASGI start message."""
    cycle = getattr(send, "__self__", None)
    if cycle.__class__ is not RequestResponseCycle or not _write_head(
            cycle, status, headers, lines, len(body)):
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, *head_fields(lines),
                                (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def head_fields(lines: bytes) -> list[tuple[bytes, bytes]]:
    """Lines of a head (``name: value\\r\\n`` each) as ASGI (name, value) pairs."""
    return [(name, value) for name, _, value in
            (line.partition(b": ") for line in lines.split(b"\r\n") if line)]


_FIELD = b"%s: %s\r\n"
# Header names seen valid (lower-case, no separators) and not ones uvicorn must see to
# frame the response itself: a response's names come from flowc's code and providers'
# answers, a small set, checked once each. Bounded all the same.
_NAMES: set[bytes] = set()
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection"})


def _names_ok(fields: dict[bytes, bytes]) -> bool:
    for name in fields:
        if name not in _NAMES:
            if (name.__class__ is not bytes or not name.islower() or name in _FRAMING
                    or HEADER_RE.search(name)):
                return False
            if len(_NAMES) < 1024:
                _NAMES.add(name)
    return True


def _write_head(cycle: RequestResponseCycle, status: int,
                headers: list[tuple[bytes, bytes]], lines: bytes, length: int) -> bool:
    """What uvicorn's `RequestResponseCycle.send` does with a start message, for a head of
    valid, distinct, lower-case names and valid values, none of them framing the response:
    False (nothing written) for any other, which then takes uvicorn's own path."""
    if (cycle.response_started or cycle.flow.write_paused or cycle.disconnected
            or cycle.access_log):
        return False
    every = cycle.default_headers + headers
    fields = dict(every)
    if (len(fields) != len(every)
            or (not _NAMES.issuperset(fields) and not _names_ok(fields))
            or HEADER_VALUE_RE.search(b"".join(fields.values()))):
        return False
    head = [STATUS_LINE[status], b"".join(map(_FIELD.__mod__, every)), lines,
            b"content-length: %d\r\n" % length]
    if not cycle.keep_alive:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    cycle.chunked_encoding = False
    cycle.expected_content_length = length
    cycle.transport.write(b"".join(head))
    return True


def uvicorn_options() -> dict[str, Any]:
    """The uvicorn settings flowc serves with, one process or many."""
    # No `server: uvicorn` header: it names the software to whoever asks, and costs every
    # response a header.
    return {"loop": "uvloop", "http": CoalescingProtocol, "timeout_graceful_shutdown": 10,
            "access_log": False, "server_header": False}

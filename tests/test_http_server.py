"""The HTTP server flowc runs (runtime/http_server.py): uvicorn with a response's head and
body sent as one write, and streams still sent as they are produced."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from runtime.access.limits import Window
from runtime.http_server import CoalescingProtocol, respond, uvicorn_options

SENT: list[bytes] = []  # what the server handed to the socket's transport, write by write


class _Counting:
    """A real transport that remembers each write it is given."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        SENT.append(bytes(data))
        self._transport.write(data)

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _CountingProtocol(CoalescingProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_Counting(transport))  # type: ignore[arg-type]


BIG = bytes(range(256)) * 4096  # 1 MiB
CHUNK, EXPORT_CHUNKS = b"x" * 32 * 1024, 200  # 6.4 MiB
next_chunk = threading.Event()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    await receive()
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: one\n\n", "more_body": True})
        # The second event waits for the client to have read the first: a buffer that held
        # a stream's events back would hang here.
        await asyncio.get_running_loop().run_in_executor(None, next_chunk.wait, 10)
        await send({"type": "http.response.body", "body": b"data: two\n\n"})
        return
    if scope["path"] == "/export":  # a large body produced without a pause (no await)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/csv")]})
        for _ in range(EXPORT_CHUNKS):
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    if scope["path"].startswith("/respond"):  # a gateway answer, as the hot path sends it
        headers = [(b"content-type", b"application/json"), (b"x-flowc-model", b"m-1")]
        limits = Window("key 'k'", 100, 1000)  # a limited key's `x-ratelimit-*` lines
        limits.take(1000.0)
        limits.add_tokens(1000.0, 12)
        if scope["path"].endswith("/injected"):  # a value from upstream, CRLF and all
            headers.append((b"x-flowc-route", b"m\r\nset-cookie: stolen=1"))
        direct = send

        async def wrapped(message: dict[str, Any]) -> None:  # not uvicorn's own send
            await direct(message)

        await respond(wrapped if "wrapped" in scope["path"] else send, 200, headers,
                      b'{"ok":true}', limits.head_lines(1000.25))
        return
    body = BIG if scope["path"] == "/big" else b'{"ok":true}'
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    options = {**uvicorn_options(), "http": _CountingProtocol}
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", **options))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):
        if srv.started:
            break
        threading.Event().wait(0.01)
    yield sock.getsockname()[1]
    srv.should_exit = True
    thread.join(10)


def _request(port: int, path: str) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    return conn


def _read_until(conn: socket.socket, end: bytes) -> bytes:
    got = b""
    while end not in got:
        part = conn.recv(1 << 20)
        assert part, f"connection closed after {got!r}"
        got += part
    return got


def test_uvicorn_options_serve_with_the_coalescing_protocol() -> None:
    assert uvicorn_options()["http"] is CoalescingProtocol
    assert uvicorn_options()["loop"] == "uvloop"


def test_an_answer_leaves_in_one_write(server: int) -> None:
    SENT.clear()
    with _request(server, "/small") as conn:
        got = _read_until(conn, b'{"ok":true}')
    assert got.startswith(b"HTTP/1.1 200 OK\r\n")
    assert [got] == SENT  # head and body together: one segment, one wake-up of the client
    head = got.partition(b"\r\n\r\n")[0].lower()
    assert b"\r\nserver:" not in head and b"uvicorn" not in head  # the software unnamed
    assert b"\r\ndate: " in head


def test_keep_alive_answers_each_in_one_write(server: int) -> None:
    SENT.clear()
    with socket.create_connection(("127.0.0.1", server), timeout=10) as conn:
        for _ in range(3):
            conn.sendall(b"GET /small HTTP/1.1\r\nHost: localhost\r\n\r\n")
            _read_until(conn, b'{"ok":true}')
    assert len(SENT) == 3


def test_a_large_body_arrives_whole(server: int) -> None:
    with _request(server, "/big") as conn:
        got = b""
        while len(got) < len(BIG) or b"\r\n\r\n" not in got:
            head, _, body = got.partition(b"\r\n\r\n")
            if body and len(body) >= len(BIG):
                break
            got += conn.recv(1 << 20)
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"content-length: %d" % len(BIG) in head
    assert body == BIG


def test_a_stream_sends_each_event_as_it_is_produced(server: int) -> None:
    next_chunk.clear()
    with _request(server, "/stream") as conn:
        first = _read_until(conn, b"data: one\n\n")  # arrives before the second exists
        assert first.startswith(b"HTTP/1.1 200 OK\r\n")
        next_chunk.set()
        rest = _read_until(conn, b"0\r\n\r\n")
    assert b"data: two\n\n" in rest


def test_a_large_body_sent_without_a_pause_is_not_held_whole(server: int) -> None:
    SENT.clear()
    with _request(server, "/export") as conn:
        got = _read_until(conn, b"\r\n0\r\n\r\n")
    assert got.count(CHUNK) == EXPORT_CHUNKS
    # written as it is produced, a few chunks at a time: never the whole export in memory
    assert len(SENT) >= EXPORT_CHUNKS // 3
    assert max(len(w) for w in SENT) < 4 * len(CHUNK)


def _head(port: int, path: str, version: str = "1.1") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(f"GET {path} HTTP/{version}\r\nHost: localhost\r\n\r\n".encode())
        got = _read_until(conn, b'{"ok":true}')
    head = got.partition(b"\r\n\r\n")[0]
    return b"\r\n".join(line for line in head.split(b"\r\n")
                         if not line.startswith(b"date: "))


def test_an_answer_written_by_respond_has_the_head_uvicorn_writes(server: int) -> None:
    for version in ("1.1", "1.0"):  # kept alive, and closed after the answer
        SENT.clear()
        ours = _head(server, "/respond", version)
        assert len(SENT) == 1
        assert ours == _head(server, "/respond/wrapped", version)  # uvicorn's own path
        assert b"\r\ncontent-length: 11" in ours
        assert (b"\r\nx-ratelimit-remaining-requests: 99\r\nx-ratelimit-reset-requests: "
                b"59.75s\r\n") in ours
        assert b"\r\nx-ratelimit-remaining-tokens: 988\r\n" in ours
        assert (b"\r\nconnection: close" in ours) == (version == "1.0")


def test_a_header_value_with_a_line_break_never_splits_the_head(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server), timeout=10) as conn:
        conn.sendall(b"GET /respond/injected HTTP/1.1\r\nHost: localhost\r\n\r\n")
        got = b""
        while part := conn.recv(1 << 16):
            got += part
    assert b"set-cookie" not in got.lower()

"""flowc's HTTP/1.1 client for upstream POSTs (runtime/providers/http1.py), against a real
loopback server scripted per connection: what goes on the wire, keep-alive reuse, a kept-alive
connection the server closed while idle, every way an answer's body can be delimited, gzip,
timeouts, refused and cut connections, and the errors `Endpoint.post` turns them into."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Awaitable, Callable

import pytest

from runtime.providers.base import Endpoint, UpstreamTimeout, UpstreamUnavailable
from runtime.providers.http1 import Pool, ProtocolError

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"
Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Upstream:
    """A loopback server: each connection's requests are read (head and Content-Length
    body, kept in ``requests``) and answered by ``answer(reader, writer, n)``, n counting
    the requests on that connection."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:")))
                self.requests.append(head + await reader.readexactly(length))
                n += 1
                await self.answer(reader, writer, n)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    writer.write(OK)
    await writer.drain()


def test_requests_share_one_kept_alive_connection_and_are_written_as_sent() -> None:
    async def main() -> None:
        up = Upstream(ok)
        async with up as url:
            pool = Pool(url + "/v1")
            for _ in range(3):
                status, headers, body = await pool.post(
                    "/chat/completions", b'{"a":1}', {"authorization": "Bearer sk-x"}, 5)
                assert (status, body) == (200, b'{"ok":true}')
                assert headers["content-type"] == "application/json"
            await pool.close()
        assert up.connections == 1
        port = url.rsplit(":", 1)[1]
        assert up.requests[0] == (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:" + port.encode() +
            b"\r\nContent-Length: 7\r\nauthorization: Bearer sk-x\r\n\r\n{\"a\":1}")
    run(main())


@pytest.mark.parametrize("pause", [0.0, 0.05])
def test_a_connection_the_server_closed_while_idle_is_replaced_and_the_request_sent_once(
        pause: float) -> None:
    async def close_after_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                 n: int) -> None:
        writer.write(OK)  # no `Connection: close`: the client believes it kept alive
        await writer.drain()
        writer.close()

    async def main() -> None:
        up = Upstream(close_after_answer)
        async with up as url:
            pool = Pool(url)
            for _ in range(3):
                assert (await pool.post("/x", b"{}", {}, 5))[0] == 200
                await asyncio.sleep(pause)  # the close has reached the client, or not yet
        assert up.connections == 3 and len(up.requests) == 3
    run(main())


def test_connection_close_and_keep_alive_timeout_hints_are_honoured() -> None:
    async def close_header(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()

    async def hint_1s(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=1\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()

    async def main() -> None:
        for answer in (close_header, hint_1s):
            up = Upstream(answer)
            async with up as url:
                pool = Pool(url)
                for _ in range(2):
                    assert (await pool.post("/x", b"{}", {}, 5))[2] == b"{}"
            # `Connection: close`: a new connection each time; a 1 s keep-alive hint: the
            # connection is not trusted past it (0 s left after the 1 s margin)
            assert up.connections == 2, answer.__name__
    run(main())


@pytest.mark.parametrize("answer,expected", [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n",
     b'{"a":1}'),
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"until\":\"close\"}",
     b'{"until":"close"}'),
    (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s",
     b'{"zipped":true}'),
])
def test_bodies_chunked_read_until_close_and_gzipped(answer: bytes, expected: bytes) -> None:
    if b"gzip" in answer:
        packed = gzip.compress(expected)
        answer = answer % (len(packed), packed)

    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(answer)
        await writer.drain()
        if b"until" in answer:
            writer.close()

    async def main() -> None:
        async with Upstream(send) as url:
            assert (await Pool(url).post("/x", b"{}", {}, 5))[::2] == (200, expected)
    run(main())


def test_an_answer_cut_short_is_an_error_and_not_sent_again() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"par")
        await writer.drain()
        writer.close()

    async def fresh() -> None:
        up = Upstream(cut)
        async with up as url:
            with pytest.raises(ConnectionResetError):
                await Pool(url).post("/x", b"{}", {}, 5)
        assert len(up.requests) == 1
    run(fresh())


def test_garbage_is_a_protocol_error_and_a_line_break_in_a_header_is_refused() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      n: int) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        up = Upstream(garbage)
        async with up as url:
            with pytest.raises(ProtocolError):
                await Pool(url).post("/x", b"{}", {}, 5)
            with pytest.raises(ValueError, match="line break"):
                await Pool(url).post("/x", b"{}", {"x-a": "1\r\nx-injected: 1"}, 5)
        assert len(up.requests) == 1
    run(main())


def test_endpoint_post_reports_timeouts_and_refusals_as_the_providers_failures() -> None:
    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await asyncio.sleep(10)

    async def main() -> None:
        async with Upstream(never) as url:
            ep = Endpoint("openai", "openai", url + "/v1", "sk-test", timeout=0.3)
            with pytest.raises(UpstreamTimeout) as timed_out:
                await ep.post("/chat/completions", {"model": "m"}, {})
            assert timed_out.value.status == 504
            await ep.close()
        refused = Endpoint("openai", "openai", url + "/v1", "sk-test", timeout=5)
        with pytest.raises(UpstreamUnavailable) as exc:
            await refused.post("/chat/completions", {"model": "m"}, {})
        assert exc.value.status == 502
        assert str(exc.value) == "openai: connection failed (ConnectionRefusedError)"
    run(main())

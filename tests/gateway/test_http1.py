"""The hand-written HTTP/1.1 upstream client against raw loopback servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.config import Timeouts
from gateway.errors import UpstreamError
from gateway.upstream import UpstreamClient
from tests.fakes.listeners import full_accept_queue
from tests.wait import eventually_async

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
T = Timeouts(connect=1, first_byte=2, idle=2, total=5)


async def _read_request(r: asyncio.StreamReader) -> bytes:
    head = await r.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + (await r.readexactly(length) if length else b"")


async def serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1/chat/completions"


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    c = UpstreamClient()
    await c.start()
    yield c
    await c.close()


async def test_pooled_connection_closed_by_server_is_retried_transparently(client: UpstreamClient) -> None:
    connections = 0

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await _read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        w.close()  # keep-alive announced (HTTP/1.1 default) but the server closes anyway

    server, url = await serve(handler)
    async with server:
        for _ in range(3):
            resp = await client.post(url, b"{}", {}, T)
            assert await resp.read() == b"ok"
            resp.close()
            # the server's FIN has reached the pooled connection: reusing a stale one is the point
            await eventually_async(
                lambda: all(c.lost for q in client._pool._idle.values() for c in q),  # type: ignore[union-attr]
                2,
                "the server's FIN",
            )
    assert connections == 3


async def test_keep_alive_connection_is_reused(client: UpstreamClient) -> None:
    connections = 0

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                await _read_request(r)
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await w.drain()
        except asyncio.IncompleteReadError:
            w.close()

    server, url = await serve(handler)
    async with server:
        for _ in range(5):
            resp = await client.post(url, b"{}", {}, T)
            assert await resp.read() == b"ok"
            resp.close()
    assert connections == 1


async def test_chunked_body_is_decoded_chunk_by_chunk(client: UpstreamClient) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (b"data: 1\n\n", b"data: 2\n\n"):
            w.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            await w.drain()
            await asyncio.sleep(0.02)
        w.write(b"0\r\n\r\n")
        await w.drain()

    server, url = await serve(handler)
    async with server:
        resp = await client.post(url, b"{}", {}, T)
        got = [c async for c in resp.chunks()]
        resp.close()
    assert b"".join(got) == b"data: 1\n\ndata: 2\n\n" and len(got) == 2


async def test_close_delimited_body_is_read_to_the_end(client: UpstreamClient) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await w.drain()
        w.close()

    server, url = await serve(handler)
    async with server:
        resp = await client.post(url, b"{}", {}, T)
        assert await resp.read() == b"all of it"
        resp.close()


async def test_garbage_response_is_a_protocol_error(client: UpstreamClient) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"NOT HTTP AT ALL\r\n\r\n")
        await w.drain()

    server, url = await serve(handler)
    async with server:
        with pytest.raises(UpstreamError) as e:
            await client.post(url, b"{}", {}, T)
    assert e.value.kind == "protocol"


async def test_header_injection_is_refused(client: UpstreamClient) -> None:
    with pytest.raises(ValueError, match="line breaks"):
        await client.post("http://127.0.0.1:9/v1/x", b"{}", {"X-Request-Id": "a\r\nHost: evil"}, T)


async def test_connect_refused_is_retryable(client: UpstreamClient) -> None:
    server, url = await serve(lambda r, w: asyncio.sleep(0))
    server.close()
    await server.wait_closed()
    with pytest.raises(UpstreamError) as e:
        await client.post(url, b"{}", {}, T)
    assert e.value.kind == "connect" and e.value.retryable


async def test_connect_timeout_trips_on_time_and_is_retryable(client: UpstreamClient) -> None:
    import time

    with full_accept_queue() as port:
        t0 = time.monotonic()
        with pytest.raises(UpstreamError) as e:
            await client.post(
                f"http://127.0.0.1:{port}/v1/x", b"{}", {}, Timeouts(connect=0.3, first_byte=5, idle=5, total=10)
            )
        assert 0.25 < time.monotonic() - t0 < 1.5
        assert e.value.kind == "timeout_connect" and e.value.retryable

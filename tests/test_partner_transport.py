"""The aiohttp transport under the partner clients' httpx client, against a real HTTP server.

The server is a plain ``asyncio`` socket server on 127.0.0.1 so that it can misbehave in ways a
well-written web framework would not: answer late, compress, send an oversized body, reply with
garbage or hang up. Each case checks what the worker's error classification depends on — the
httpx exception class — and that connections are reused between calls.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import orjson
import pytest
import pytest_asyncio

from quartermaster.integrations import DEV_SIGNING_SECRET, RetryableError, ShopClient
from quartermaster.integrations.shop.client import AvailabilityUpdate
from quartermaster.integrations.transport import MAX_RESPONSE_BYTES, AiohttpTransport

LIMITS = httpx.Limits(max_connections=4, max_keepalive_connections=4, keepalive_expiry=30)


@dataclass
class Seen:
    """What the server saw: one entry per request (its head and body), and the connections."""

    heads: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    connections: int = 0


Behaviour = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]


def reply(status: int, body: bytes, *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@pytest_asyncio.fixture
async def server() -> AsyncIterator[Callable[[Behaviour], Awaitable[tuple[str, Seen]]]]:
    """Start servers on free ports; ``behaviour(head, writer)`` answers one request and says
    whether to keep the connection open."""
    servers: list[asyncio.Server] = []

    async def start(behaviour: Behaviour) -> tuple[str, Seen]:
        seen = Seen()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.connections += 1
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n"):
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    seen.heads.append(head)
                    seen.bodies.append(await reader.readexactly(length))
                    if not await behaviour(head, writer):
                        break
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(srv)
        port = srv.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}", seen

    yield start
    for srv in servers:
        srv.close()
        await srv.wait_closed()


def client(url: str, timeout: float = 5.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url, timeout=httpx.Timeout(timeout), transport=AiohttpTransport(limits=LIMITS)
    )


async def ok(head: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(reply(200, b'{"ok": true}', "Content-Type: application/json", "X-Echo: 1"))
    await writer.drain()
    return True


async def test_request_and_answer_pass_through_and_connections_are_reused(server) -> None:
    url, seen = await server(ok)
    async with client(url) as http:
        for n in range(3):
            response = await http.put(
                "/v1/availability/A%2FB",
                content=b'{"n": %d}' % n,
                headers={"Idempotency-Key": f"k-{n}", "Content-Type": "application/json"},
            )
            assert response.status_code == 200
            assert response.json() == {"ok": True}
            assert response.headers["x-echo"] == "1"
            assert response.http_version == "HTTP/1.1"
    assert seen.connections == 1, "keep-alive: three calls, one connection"
    assert seen.bodies == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']
    first = seen.heads[0].decode()
    assert first.startswith("PUT /v1/availability/A%2FB HTTP/1.1\r\n"), "path sent as encoded"
    assert "Idempotency-Key: k-0" in first
    assert "Content-Length: 8" in first


async def test_gzip_answers_are_decoded_once(server) -> None:
    body = gzip.compress(orjson.dumps({"sku": "X", "available": 3}))

    async def gzipped(head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(reply(200, body, "Content-Encoding: gzip", "Content-Type: application/json"))
        await writer.drain()
        return True

    url, _ = await server(gzipped)
    async with client(url) as http:
        response = await http.get("/")
    assert response.json() == {"sku": "X", "available": 3}


async def test_slow_answer_is_a_read_timeout_and_a_retryable_partner_error(server) -> None:
    async def slow(head: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(1.0)
        return await ok(head, writer)

    url, _ = await server(slow)
    async with client(url, timeout=0.2) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get("/")
    async with ShopClient(url, signing_secret=DEV_SIGNING_SECRET, timeout=0.2) as shop:
        with pytest.raises(RetryableError, match=r"^shop: timed out \(ReadTimeout\)$"):
            await shop.push_availability([AvailabilityUpdate(1, "X", 1)], "k")


async def test_refused_connection_is_a_connect_error() -> None:
    # A port that was just listening and is closed again refuses connections.
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    async with client(f"http://127.0.0.1:{port}") as http:
        with pytest.raises(httpx.ConnectError):
            await http.get("/")


async def test_hang_up_before_answering_is_a_protocol_error(server) -> None:
    async def hang_up(head: bytes, writer: asyncio.StreamWriter) -> bool:
        return False

    url, _ = await server(hang_up)
    async with client(url) as http:
        with pytest.raises(httpx.TransportError) as caught:
            await http.get("/")
    assert isinstance(caught.value, httpx.RemoteProtocolError | httpx.ReadError)
    assert caught.value.request.url.path == "/"


async def test_garbage_instead_of_http_is_a_protocol_error(server) -> None:
    async def garbage(head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"this is not HTTP at all\r\n\r\n")
        await writer.drain()
        return False

    url, _ = await server(garbage)
    async with client(url) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get("/")


async def test_oversized_answer_is_refused(server) -> None:
    big = b"x" * (MAX_RESPONSE_BYTES + 1)

    async def huge(head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(reply(200, big))
        await writer.drain()
        return False

    url, _ = await server(huge)
    async with client(url) as http:
        with pytest.raises(httpx.RemoteProtocolError, match="over"):
            await http.get("/")


async def test_closed_transport_can_be_closed_again_and_unused_one_closes_cleanly() -> None:
    transport = AiohttpTransport(limits=LIMITS)
    await transport.aclose()  # never opened
    await transport.aclose()

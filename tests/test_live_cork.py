"""Frames of a batch leave together: ``LiveConnection.hold``/``release`` cork the connection's
TCP socket, found behind the ASGI server's ``send`` (``live/transport.py``). Checked on a real
uvicorn server (the implementation ``quartermaster serve`` uses) with a real client socket."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
from websockets.asyncio.client import connect

from quartermaster.live.connection import RAW_WEBSOCKET_SEND, LiveConnection
from quartermaster.live.transport import _corker

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_CORK"), reason="TCP_CORK is Linux's")


class Owner:
    pending = 0
    closed = False


async def test_hold_and_release_nest_and_cork_once() -> None:
    calls: list[bool] = []
    sent: list[str] = []

    async def send(frame: str) -> None:
        sent.append(frame)

    async def close(code: int, reason: str) -> None:
        pass

    conn = LiveConnection(send, close, 10, on_fail=lambda c: None, cork=calls.append)
    conn.hold()
    conn.hold()
    conn.push(Owner(), "a")
    conn.release()
    assert calls == [True]  # still held by the outer hold
    conn.push(Owner(), "b")
    conn.release()
    assert calls == [True, False] and sent == ["a", "b"]
    conn.release()  # an extra release does not uncork twice or go negative
    conn.hold()
    assert calls == [True, False, False, True]


async def test_the_corker_sets_tcp_cork_on_a_real_uvicorn_websocket() -> None:
    seen: list[tuple[int, int, int]] = []
    done = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        # what RequestContextMiddleware leaves in the scope for live subscriptions
        cork = _corker(SimpleNamespace(scope={**scope, RAW_WEBSOCKET_SEND: send}))
        assert cork is not None
        sock = send.__self__.transport.get_extra_info("socket")

        def state() -> int:
            return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK))

        before = state()
        cork(True)
        during = state()
        for frame in ("one", "two", "three"):
            await send({"type": "websocket.send", "text": frame})
        cork(False)
        seen.append((before, during, state()))
        done.set()
        await receive()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, ws="websockets-sansio", log_level="warning"
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        for _ in range(250):  # uvicorn has no event for "started"
            if server.started:
                break
            await asyncio.sleep(0.02)
        async with connect(f"ws://127.0.0.1:{port}/") as ws:
            frames = [await asyncio.wait_for(ws.recv(), 5) for _ in range(3)]
            await asyncio.wait_for(done.wait(), 5)
        assert frames == ["one", "two", "three"]  # all three arrive, in order, once uncorked
        assert seen == [(0, 1, 0)]
    finally:
        server.should_exit = True
        await serving

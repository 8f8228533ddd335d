"""Our graphql-transport-ws handler: strawberry's, plus the hooks live subscriptions need.

- every operation runs with ``LIVE_OPERATION`` set, so the ``stockChanged`` resolver can
  hand its subscription to the hub as pre-rendered frames (``live/subscription.py``)
  instead of yielding objects that strawberry would execute per subscriber;
- the connection's frame writer (``LiveConnection``) is created on first use and stopped
  with the connection;
- the subscription cap answers with ``extensions.code = TOO_MANY_SUBSCRIPTIONS``, and errors
  raised before a subscription starts carry their codes like every other error;
- protocol messages go out as text frames (the view's JSON encoder returns bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, cast

import orjson
from starlette.websockets import WebSocketDisconnect
from strawberry.http.exceptions import WebSocketDisconnected
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import (
    BaseGraphQLTransportWSHandler,
    Operation,
)
from strawberry.subscriptions.protocols.graphql_transport_ws.types import (
    Message,
    SubscribeMessage,
)
from strawberry.types.execution import PreExecutionError

from quartermaster.live.connection import RAW_WEBSOCKET_SEND, LiveConnection
from quartermaster.schema.extensions import normalize_error


@dataclass(frozen=True, slots=True)
class LiveOperation:
    handler: LiveTransportWSHandler
    operation: Operation[Any, Any]

    def finish(self) -> None:
        """The subscription ended server-side and its last frame is on its way: no
        ``complete`` after it, and the id is free again."""
        operation = self.operation
        operation.completed = True
        if self.handler.operations.get(operation.id) is operation:
            del self.handler.operations[operation.id]


def bearer_token(params: dict[str, Any]) -> str | None:
    """The token of a ``connection_init`` payload, if it carries one."""
    token = params.get("token")
    if isinstance(token, str) and token:
        return token
    for name in ("Authorization", "authorization"):
        value = params.get(name)
        if isinstance(value, str) and value[:7].lower() == "bearer " and value[7:].strip():
            return value[7:].strip()
    return None


#: The graphql-transport-ws operation the current task runs (None elsewhere).
LIVE_OPERATION: ContextVar[LiveOperation | None] = ContextVar("qm_live_operation", default=None)


#: Close code when the token a connection signed in with expires (re-connect with a new one).
TOKEN_EXPIRED_CLOSE = 4401


class LiveTransportWSHandler(BaseGraphQLTransportWSHandler[Any, Any]):
    _live: LiveConnection | None = None
    _expiry: asyncio.Task[None] | None = None

    async def handle_connection_init(self, message: Any) -> None:
        await super().handle_connection_init(message)
        principal = getattr(self.context, "principal", None)
        expires_at = getattr(principal, "expires_at", None)
        if self.connection_acknowledged and expires_at is not None:
            self._expiry = asyncio.create_task(self._close_at(expires_at))

    async def _close_at(self, expires_at: float) -> None:
        """The token a connection signed in with is checked once, at ``connection_init``; when
        it expires the connection closes (4401) and the client signs in again, resuming its
        subscriptions with ``after``."""
        await asyncio.sleep(max(0.0, expires_at - time.time()))
        with contextlib.suppress(Exception):
            await self.websocket.close(code=TOKEN_EXPIRED_CLOSE, reason="Token expired")

    def live_connection(self, hub: Any) -> LiveConnection:
        if self._live is None:
            ws = getattr(self.websocket, "ws", None)
            if ws is None:  # pragma: no cover - only the ASGI adapter is used
                raise RuntimeError("live subscriptions need the ASGI WebSocket adapter")
            self._live = LiveConnection(
                send=_frame_sender(ws),
                cork=_corker(ws),
                close=self.websocket.close,
                queue_size=hub.queue_size,
                on_fail=hub.drop_connection,
                on_slow=hub.metrics.slow_closes.inc,
            )
        return self._live

    async def handle_subscribe(self, message: SubscribeMessage) -> None:
        limit = self.max_subscriptions_per_connection
        if (
            self.connection_acknowledged
            and limit is not None
            and message["id"] not in self.operations
            and len(self.operations) >= limit
        ):
            await self.send_message(
                {
                    "id": message["id"],
                    "type": "error",
                    "payload": [
                        {
                            "message": f"At most {limit} operations may run on one connection.",
                            "extensions": {"code": "TOO_MANY_SUBSCRIPTIONS", "limit": limit},
                        }
                    ],
                }
            )
            return
        await super().handle_subscribe(message)

    async def send_message(self, message: Message) -> None:
        # Text frames, as the protocol wants: the view's JSON encoder returns bytes, which
        # strawberry would send as binary frames that browser clients cannot parse.
        ws = getattr(self.websocket, "ws", None)
        if ws is None:  # pragma: no cover - only the ASGI adapter is used
            await super().send_message(message)
            return
        try:
            await ws.send_text(orjson.dumps(message).decode())
        except WebSocketDisconnect as exc:
            raise WebSocketDisconnected from exc

    async def run_operation(self, operation: Operation[Any, Any]) -> None:
        token = LIVE_OPERATION.set(LiveOperation(self, operation))
        try:
            await super().run_operation(operation)
        finally:
            LIVE_OPERATION.reset(token)

    async def _handle_pre_execution_error(
        self, operation: Operation[Any, Any], result: PreExecutionError
    ) -> None:
        request_id = getattr(self.context, "request_id", None)
        result.errors = [normalize_error(e, request_id) for e in result.errors or []]
        await super()._handle_pre_execution_error(operation, result)

    async def shutdown(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        await super().shutdown()
        if self._live is not None:
            await self._live.aclose()


def _frame_sender(ws: Any) -> Callable[[str], Awaitable[None]]:
    """How frames go out: straight to the ASGI server's ``send`` when the request middleware
    left it in the scope, else through Starlette's ``send_text``. Starlette's WebSocket and its
    exception middleware add state checks and a wrapper per call, about a tenth of the CPU of a
    fan-out to a thousand subscribers; the server itself refuses a frame after the close (the
    connection's writer then fails and cleans up, as it would on Starlette's error)."""
    raw = ws.scope.get(RAW_WEBSOCKET_SEND)
    if raw is None:
        return cast(Callable[[str], Awaitable[None]], ws.send_text)

    async def send_text(text: str) -> None:
        await raw({"type": "websocket.send", "text": text})

    return send_text


def _corker(ws: Any) -> Callable[[bool], None] | None:
    """Sets and clears TCP_CORK on the connection's socket (Linux), found through the ASGI
    server's protocol object behind its ``send``; None where there is no such socket (another
    server, a Unix socket, another OS): the hub then simply sends frame by frame. The hub
    uncorks in a ``finally``; Linux would flush a socket left corked after 200 ms anyway."""
    if not hasattr(socket, "TCP_CORK"):
        return None
    raw = ws.scope.get(RAW_WEBSOCKET_SEND)
    transport = getattr(getattr(raw, "__self__", None), "transport", None)
    if transport is None:
        return None
    try:
        sock = transport.get_extra_info("socket")
    except Exception:
        return None
    if sock is None or getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return None
    option = socket.TCP_CORK

    def cork(on: bool) -> None:
        with contextlib.suppress(OSError, ValueError):  # a socket closed meanwhile
            sock.setsockopt(socket.IPPROTO_TCP, option, 1 if on else 0)

    return cork

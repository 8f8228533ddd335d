"""Opening a ``stockChanged`` subscription: check the cursor, register, replay, go live.

Over graphql-transport-ws (our handler sets ``LIVE_OPERATION``) the subscription is served
as frames: the selection is rendered once per event and render group and the hub appends
ready ``next`` frames to the connection's writer; the async iterator strawberry gets never
yields and only keeps the subscription registered until the client completes it or goes
away. On any other transport the iterator yields the shared event objects and strawberry
executes the selection per subscriber, as usual.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
from strawberry.types import Info

from quartermaster.errors import ApiError
from quartermaster.live.events import CursorExpiredError, EventFilter, StreamId
from quartermaster.live.hub import StockHub
from quartermaster.live.render import (
    RenderGroup,
    access_scope,
    document_of,
    render_key,
    selection_variables,
)
from quartermaster.live.subscribers import FrameSubscriber, QueueSubscriber
from quartermaster.live.transport import LIVE_OPERATION, LiveOperation


async def open_stock_subscription(
    info: Info[Any, Any], event_filter: EventFilter, after: StreamId | None
) -> AsyncIterator[Any]:
    hub: StockHub | None = getattr(info.context, "live", None)
    if hub is None:
        raise ApiError(
            "Live stock subscriptions need Redis (QM_REDIS_URL).", code="SERVICE_UNAVAILABLE"
        )
    if after is not None:
        # Before anything starts, so an expired or foreign cursor is an `error` message.
        await hub.check_cursor(after)
    live = LIVE_OPERATION.get()
    if live is not None:
        return _frames(hub, info, live, event_filter, after)
    return _events(hub, info.context, event_filter, after)


def _group(hub: StockHub, info: Info[Any, Any], live: LiveOperation) -> RenderGroup:
    raw = info._raw_info
    fragments = list(raw.fragments.values())
    operation = live.operation
    principal = getattr(info.context, "principal", None)
    used = selection_variables(raw.operation, fragments, raw.field_nodes)
    key = render_key(
        operation.query,
        operation.operation_name,
        operation.variables,
        used,
        access_scope(principal),
    )
    return hub.group(
        key,
        lambda: RenderGroup(
            key,
            raw.schema,
            document_of(raw.operation, fragments),
            operation.operation_name,
            dict(operation.variables or {}),
            principal,
        ),
    )


async def _frames(
    hub: StockHub,
    info: Info[Any, Any],
    live: LiveOperation,
    event_filter: EventFilter,
    after: StreamId | None,
) -> AsyncIterator[Any]:
    connection = live.handler.live_connection(hub)
    operation_id = orjson.dumps(live.operation.id).decode()
    prefix = '{"id":' + operation_id + ',"type":"next","payload":'
    sub = FrameSubscriber(event_filter, _group(hub, info, live), connection, prefix)
    group = sub.group
    assert group is not None
    hub.register(sub, replaying=after is not None)
    connection.subscribers.add(sub)
    try:
        if connection.failed:
            return
        if after is not None:
            replay = hub.replay(sub, after)
            try:
                async for page in replay.pages():
                    context = hub.context(group.principal)
                    for event in page:
                        rendered = hub.render(group, event, context)
                        payload = rendered if isinstance(rendered, str) else await rendered
                        await connection.wait_capacity(sub)
                        if not connection.push(sub, prefix + payload + "}"):
                            return
                        hub.metrics.deliveries.inc()
            except CursorExpiredError as exc:
                # Trimmed while replaying: the client gets the same error it would have got
                # up front, after the events it did get.
                hub.unregister(sub)
                finished = asyncio.get_running_loop().create_future()
                error = {"message": exc.message, "extensions": exc.extensions}
                frame = orjson.dumps(
                    {"id": live.operation.id, "type": "error", "payload": [error]}
                ).decode()

                def finish() -> None:
                    live.finish()
                    if not finished.done():
                        finished.set_result(None)

                connection.push_last(sub, frame, finish)
                await finished
                return
            hub.go_live(sub, replay.cursor)
        # Live frames come from the hub from now on; this only waits for the end.
        await asyncio.get_running_loop().create_future()
    finally:
        connection.subscribers.discard(sub)
        hub.unregister(sub)
    yield  # pragma: no cover - never reached; makes this an async generator


async def _events(
    hub: StockHub, context: Any, event_filter: EventFilter, after: StreamId | None
) -> AsyncIterator[Any]:
    sub = QueueSubscriber(event_filter, hub.queue_size)
    hub.register(sub, replaying=after is not None)
    reset = getattr(context, "reset_loaders", None)
    try:
        if after is not None:
            replay = hub.replay(sub, after)
            async for page in replay.pages():
                for event in page:
                    if reset is not None:
                        reset()  # product rows read per event, never cached for a whole stream
                    yield event.graphql
            hub.go_live(sub, replay.cursor)
        while True:
            event = await sub.get()
            if reset is not None:
                reset()
            yield event.graphql
    finally:
        hub.unregister(sub)

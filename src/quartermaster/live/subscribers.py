"""Subscribers of the hub: a filter, an optional render group and a way to deliver."""

from __future__ import annotations

import asyncio
from collections import deque

from quartermaster.errors import ApiError
from quartermaster.live.connection import LiveConnection
from quartermaster.live.events import EventFilter, StockEvent, StreamId
from quartermaster.live.render import RenderGroup


class SubscriberTooSlowError(ApiError):
    code = "SUBSCRIBER_TOO_SLOW"


class Subscriber:
    """One ``stockChanged`` subscription registered with the hub."""

    __slots__ = ("buffer", "closed", "filter", "floor", "group", "pending")

    def __init__(self, event_filter: EventFilter, group: RenderGroup | None) -> None:
        self.filter = event_filter
        self.group = group
        self.pending = 0
        self.closed = False
        #: Live events that arrive while the subscriber replays (None once live).
        self.buffer: list[StockEvent] | None = None
        #: The replay covered everything up to here: live events at or below are skipped
        #: (the hub may be halfway through a batch it read before the replay ended).
        self.floor: StreamId = (0, 0)

    def deliver(self, event: StockEvent) -> None:
        raise NotImplementedError

    def overflow(self) -> None:
        """Too many events are waiting for this subscriber."""
        raise NotImplementedError


class FrameSubscriber(Subscriber):
    """A graphql-transport-ws subscription: gets the ``next`` frame, rendered per group."""

    __slots__ = ("connection", "prefix")

    def __init__(
        self,
        event_filter: EventFilter,
        group: RenderGroup,
        connection: LiveConnection,
        prefix: str,
    ) -> None:
        super().__init__(event_filter, group)
        self.connection = connection
        self.prefix = prefix

    def deliver(self, event: StockEvent) -> None:
        payload = event.rendered.get(self.group)
        if payload is not None:
            self.connection.push(self, self.prefix + payload + "}")

    def overflow(self) -> None:
        self.connection.fail_slow()


class QueueSubscriber(Subscriber):
    """Any other transport: the event object goes through strawberry per subscriber."""

    __slots__ = ("events", "limit", "overflowed", "waiter")

    def __init__(self, event_filter: EventFilter, limit: int) -> None:
        super().__init__(event_filter, None)
        self.events: deque[StockEvent] = deque()
        self.limit = limit
        self.overflowed = False
        self.waiter: asyncio.Future[None] | None = None

    def deliver(self, event: StockEvent) -> None:
        if len(self.events) >= self.limit:
            self.overflowed = True
        else:
            self.events.append(event)
        self._wake()

    def overflow(self) -> None:
        self.overflowed = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self) -> StockEvent:
        while not self.events:
            if self.overflowed:
                raise _too_slow()
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        if self.overflowed:
            raise _too_slow()
        return self.events.popleft()


def _too_slow() -> SubscriberTooSlowError:
    return SubscriberTooSlowError(
        "This subscription fell too far behind; subscribe again with `after` set to the "
        "last cursor you received."
    )

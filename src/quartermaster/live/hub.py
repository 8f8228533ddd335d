"""The per-process hub of live stock events: one Redis reader, in-memory fan-out, replay.

One task per server process reads the stock-event stream (``XREAD BLOCK`` from the last id it
saw), drops duplicates (the relay delivers at least once; an ``outbox_id`` seen within the
last ``dedup_window`` entries is a repeat), builds each event's GraphQL object once (stock
level from the payload, warehouse from a short cache; no query per subscriber) and hands it
to every subscriber whose filter matches. Subscribers never slow the reader down: a
WebSocket subscriber gets a ready frame appended to its connection's queue
(``live/connection.py``), any other one an event in a bounded queue.

Resuming (``after:``): the subscriber is registered first and buffers what the reader hands
it, then the stream is replayed from the cursor (``XRANGE``, in pages, each page checked for
trimming in the same ``MULTI``), then the buffer is drained skipping what the replay already
covered, and the replay's last id becomes the subscriber's floor (a batch the reader is still
delivering may hold older entries). Registration comes before the first ``XRANGE``, so every
entry is either in the replay or in the buffer: no gap; the floor makes sure it is not in both.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from sqlalchemy.exc import SQLAlchemyError

from quartermaster.config import Settings
from quartermaster.context import Context
from quartermaster.db.engine import Database
from quartermaster.db.repositories import warehouse as warehouse_repo
from quartermaster.enums import StockChangeReason
from quartermaster.live.events import (
    StockEvent,
    StreamId,
    check_resumable,
    format_cursor,
    parse_entry,
    stream_id,
)
from quartermaster.live.render import RenderGroup, RenderKey
from quartermaster.live.subscribers import Subscriber
from quartermaster.schema.node import encode_id
from quartermaster.schema.stock import StockLevelType
from quartermaster.schema.stock_event import StockChangeEvent
from quartermaster.schema.warehouse import WarehouseType
from quartermaster.streams import STOCK_EVENTS_STREAM

log = structlog.get_logger("quartermaster.live")

READ_COUNT = 500
READ_BLOCK_MS = 2_000
REPLAY_PAGE = 500
WAREHOUSE_TTL_S = 5.0


class LiveMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        kw: dict[str, Any] = {"registry": registry}
        self.subscriptions = Gauge("qm_live_subscriptions", "Active stockChanged subscribers", **kw)
        self.events = Counter("qm_live_events_total", "Stock events read from Redis", **kw)
        self.duplicates = Counter(
            "qm_live_duplicate_events_total", "Stream entries dropped as repeats", **kw
        )
        self.deliveries = Counter(
            "qm_live_deliveries_total", "Events handed to subscribers (live and replay)", **kw
        )
        self.renders = Counter(
            "qm_live_renders_total", "Selections executed (once per event and render group)", **kw
        )
        self.batches = Counter(
            "qm_live_dispatches_total",
            "Read batches fanned out, by whether they held several events (sent corked)",
            ["events"],
            **kw,
        )
        self.slow_closes = Counter(
            "qm_live_slow_closes_total", "Connections closed because a subscriber lagged", **kw
        )


class StockHub:
    def __init__(
        self,
        redis: Redis,
        db: Database,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        stream: str = STOCK_EVENTS_STREAM,
    ) -> None:
        self.redis = redis
        self.db = db
        self.settings = settings
        self.stream = stream
        self.queue_size = settings.live.queue_size
        #: Entries within which a repeated outbox_id is a duplicate (a relay repeats at most
        #: one batch, so twice the batch is ample).
        self.dedup_window = max(1_000, 2 * settings.jobs.relay_batch)
        self.metrics = LiveMetrics(registry)
        self.subscribers: dict[Subscriber, None] = {}
        self.groups: dict[RenderKey, RenderGroup] = {}
        self.last_id = "0-0"
        self._seen: dict[int, None] = {}
        self._warehouses: dict[int, tuple[float, WarehouseType]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._task = asyncio.create_task(self._read_loop(), name="qm-live-reader")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        # redis-py can lose a cancellation (seen while a MULTI pipeline runs) and the loop
        # would go on reading: cancel until the task is really done.
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.2)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            task.result()

    async def _stream_end(self) -> str:
        """The last id of the stream, and the dedup window seeded with the entries before."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.xinfo_stream(self.stream)
        pipe.xrevrange(self.stream, "+", "-", count=self.dedup_window)
        info, recent = await pipe.execute(raise_on_error=False)
        raise_if_cancelled()
        if isinstance(info, ResponseError):
            return "0-0"
        for entry_id, fields in reversed(recent):
            event = parse_entry(entry_id, fields)
            if event is not None:
                self._remember(event.outbox_id)
        last = info.get("last-generated-id") or b"0-0"
        return last.decode() if isinstance(last, bytes) else str(last)

    # ------------------------------------------------------------------ reading

    async def _read_loop(self) -> None:
        backoff = 0.0
        started = False
        while not self._stopping:
            try:
                if not started:
                    # Live delivery starts at the end of the stream, not at its beginning.
                    self.last_id = await self._stream_end()
                    started = True
                if self._stopping:
                    return
                reply = await self.redis.xread(
                    {self.stream: self.last_id}, count=READ_COUNT, block=READ_BLOCK_MS
                )
                raise_if_cancelled()
                backoff = 0.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._stopping:
                    return
                backoff = min(5.0, max(0.1, backoff * 2))
                log.warning("live.read_failed", error=type(exc).__name__, retry_in_s=backoff)
                await asyncio.sleep(backoff)
                continue
            entries = _entries(reply)
            if not entries:
                continue
            events = self._ingest(entries)
            if events and self.subscribers:
                try:
                    await self._dispatch(events)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("live.dispatch_failed", first=events[0].cursor)

    def _ingest(self, entries: list[Any]) -> list[StockEvent]:
        events: list[StockEvent] = []
        for entry_id, fields in entries:
            self.last_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            event = parse_entry(entry_id, fields)
            if event is None:
                log.warning("live.bad_entry", entry=self.last_id)
                continue
            self.metrics.events.inc()
            if event.outbox_id in self._seen:
                self.metrics.duplicates.inc()
                continue
            self._remember(event.outbox_id)
            events.append(event)
        return events

    def _remember(self, outbox_id: int) -> None:
        seen = self._seen
        seen[outbox_id] = None
        if len(seen) > self.dedup_window:
            del seen[next(iter(seen))]

    # ------------------------------------------------------------------ fan-out

    def context(self, principal: Any = None) -> Context:
        """A context for rendering a batch of events: its loaders are shared by every render
        group of the same caller scope, and live only as long as the batch."""
        context = Context(settings=self.settings, db=self.db, request_id="live")
        if principal is not None:
            context.principal = principal
        return context

    async def _dispatch(self, events: list[StockEvent]) -> None:
        subscribers = list(self.subscribers)
        plan: list[tuple[StockEvent, list[Subscriber]]] = []
        for event in events:
            matching = [s for s in subscribers if s.filter.matches(event)]
            if matching:
                plan.append((event, matching))
        if not plan:
            return
        await self._prepare_retrying([event for event, _ in plan])
        contexts: dict[Any, Context] = {}
        started: set[tuple[StockEvent, RenderGroup]] = set()
        pending: list[Awaitable[str]] = []
        for event, matching in plan:
            if event.graphql is None:
                continue
            for sub in matching:
                group = sub.group
                if group is None or group in event.rendered or (event, group) in started:
                    continue
                started.add((event, group))
                context = contexts.get(group.key.scope)
                if context is None:
                    context = contexts[group.key.scope] = self.context(group.principal)
                rendered = self.render(group, event, context)
                if not isinstance(rendered, str):
                    pending.append(rendered)
        if pending:
            for outcome in await asyncio.gather(*pending, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    log.error("live.render_failed", exc_info=outcome)
        # Several events for the same sockets: each connection holds its frames back (TCP
        # cork) until the batch is out, so a subscriber gets them in one transmission instead
        # of one per frame. On loopback and on busy hosts the transmission, not the copy, is
        # what a send costs; a single event goes out as it is.
        held = (
            {c for _, matching in plan for s in matching if (c := getattr(s, "connection", None))}
            if len(plan) > 1
            else set()
        )
        for connection in held:
            connection.hold()
        deliveries = 0
        try:
            for n, (event, matching) in enumerate(plan):
                if n:
                    # Let the connection writers send what the previous event queued: a burst
                    # of a whole read batch must not count against a client that does read.
                    await asyncio.sleep(0)
                for sub in matching:
                    if sub.closed or event.graphql is None or event.id <= sub.floor:
                        continue
                    if sub.buffer is not None:
                        sub.buffer.append(event)
                        if len(sub.buffer) > self.queue_size:
                            sub.buffer = None
                            sub.overflow()
                        continue
                    sub.deliver(event)
                    deliveries += 1
        finally:
            for connection in held:
                connection.release()
        self.metrics.deliveries.inc(deliveries)
        self.metrics.batches.labels("several" if held else "one").inc()

    async def _prepare_retrying(self, events: list[StockEvent]) -> None:
        # Only a warehouse missing from the cache needs the database; if it is down, wait
        # for it rather than drop events (they stay in Redis meanwhile).
        backoff = 0.1
        while True:
            try:
                await self.prepare(events)
                return
            except (OSError, SQLAlchemyError) as exc:
                log.warning("live.prepare_failed", error=type(exc).__name__, retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)

    async def prepare(self, events: list[StockEvent]) -> None:
        """Build the GraphQL object of each event: the stock level comes from the payload,
        the warehouse from a cache refreshed every few seconds (one query for all misses)."""
        now = time.monotonic()
        cache = self._warehouses
        missing = {
            e.warehouse_id
            for e in events
            if e.graphql is None and (e.warehouse_id not in cache or cache[e.warehouse_id][0] < now)
        }
        if missing:
            # The warehouse is part of the event, whoever subscribes: read it as the server.
            async with self.db.primary.connect() as conn:
                rows = await warehouse_repo.warehouses_by_ids(conn, sorted(missing))
            for row in rows:
                cache[row.id] = (now + WAREHOUSE_TTL_S, WarehouseType.from_row(row))
        for event in events:
            if event.graphql is None:
                entry = cache.get(event.warehouse_id)
                if entry is not None:
                    event.graphql = build_event(event, entry[1])

    # ------------------------------------------------------------------ subscribers

    def group(self, key: RenderKey, factory: Callable[[], RenderGroup]) -> RenderGroup:
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = factory()
        group.subscribers += 1
        return group

    def register(self, sub: Subscriber, *, replaying: bool) -> None:
        sub.buffer = [] if replaying else None
        self.subscribers[sub] = None
        self.metrics.subscriptions.set(len(self.subscribers))

    def unregister(self, sub: Subscriber) -> None:
        sub.closed = True
        sub.buffer = None
        if self.subscribers.pop(sub, False) is not False and sub.group is not None:
            sub.group.subscribers -= 1
            if sub.group.subscribers <= 0:
                self.groups.pop(sub.group.key, None)
        self.metrics.subscriptions.set(len(self.subscribers))

    def drop_connection(self, connection: Any) -> None:
        """A WebSocket failed (too slow, or gone): its subscribers stop receiving at once."""
        for sub in list(connection.subscribers):
            self.unregister(sub)

    def render(self, group: RenderGroup, event: StockEvent, context: Any) -> str | Awaitable[str]:
        self.metrics.renders.inc()
        return group.render(event, context)

    def go_live(self, sub: Subscriber, replayed_to: StreamId) -> None:
        """Deliver what arrived during the replay (skipping what it covered) and switch to
        live delivery, in one step with no await in between."""
        buffered, sub.buffer = sub.buffer or [], None
        sub.floor = replayed_to
        for event in buffered:
            if event.id > replayed_to and not sub.closed:
                sub.deliver(event)

    async def check_cursor(self, after: StreamId) -> None:
        try:
            info = await self.redis.xinfo_stream(self.stream)
        except ResponseError:
            info = None
        raise_if_cancelled()
        check_resumable(after, info)

    def replay(self, sub: Subscriber, after: StreamId) -> Replay:
        return Replay(self, sub, after)

    async def seen_before(self, after: StreamId) -> dict[int, None]:
        """Outbox ids of the ``dedup_window`` entries up to ``after``: a repeat right after
        the cursor of something the client already had is dropped on replay too."""
        seen: dict[int, None] = {}
        if after == (0, 0):
            return seen
        recent: Any = await self.redis.xrevrange(
            self.stream, format_cursor(after), "-", count=self.dedup_window
        )
        raise_if_cancelled()
        for entry_id, fields in reversed(recent or []):
            event = parse_entry(entry_id, fields)
            if event is not None:
                seen[event.outbox_id] = None
        return seen


def raise_if_cancelled() -> None:
    """redis-py can turn a cancellation into a normal return or a timeout (seen with
    pipelines): after a Redis call, a task that was asked to stop stops."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _entries(reply: Any) -> list[Any]:
    """The entries of an ``XREAD`` reply of one stream (RESP2 list or RESP3 map)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(next(iter(reply.values()))[0]) if reply else []
    return list(reply[0][1])


def build_event(event: StockEvent, warehouse: WarehouseType) -> StockChangeEvent:
    level = StockLevelType(
        id=encode_id("StockLevel", event.stock_level_id),
        pk=event.stock_level_id,
        product_id=event.product_id,
        warehouse_id=event.warehouse_id,
        on_hand=event.on_hand,
        reserved=event.reserved,
        available=event.available,
        low_stock_threshold=event.low_stock_threshold,
        is_low=event.is_low,
        # The change and the level's updated_at come from the same transaction.
        updated_at=event.occurred_at,
        warehouse=warehouse,
    )
    return StockChangeEvent(
        cursor=event.cursor,
        stock_level=level,
        reason=StockChangeReason(event.reason),
        on_hand_delta=event.on_hand_delta,
        reserved_delta=event.reserved_delta,
        occurred_at=event.occurred_at,
    )


class Replay:
    """The events after a cursor that match one subscriber, in pages, in stream order.

    Every page is read together with ``XINFO STREAM`` in one ``MULTI``, so trimming between
    the check and the read cannot go unnoticed (``CURSOR_EXPIRED``). ``cursor`` ends at the
    last entry read, which ``StockHub.go_live`` uses to skip buffered events.
    """

    def __init__(self, hub: StockHub, sub: Subscriber, after: StreamId) -> None:
        self.hub = hub
        self.sub = sub
        self.cursor = after

    async def pages(self) -> AsyncIterator[list[StockEvent]]:
        hub = self.hub
        seen = await hub.seen_before(self.cursor)
        while True:
            pipe = hub.redis.pipeline(transaction=True)
            pipe.xinfo_stream(hub.stream)
            pipe.xrange(hub.stream, "(" + format_cursor(self.cursor), "+", count=REPLAY_PAGE)
            info, entries = await pipe.execute(raise_on_error=False)
            raise_if_cancelled()
            check_resumable(self.cursor, None if isinstance(info, ResponseError) else info)
            if isinstance(entries, BaseException):
                raise entries
            page: list[StockEvent] = []
            for entry_id, fields in entries:
                self.cursor = stream_id(entry_id)
                event = parse_entry(entry_id, fields)
                if event is None or event.outbox_id in seen:
                    continue
                seen[event.outbox_id] = None
                if len(seen) > hub.dedup_window:
                    del seen[next(iter(seen))]
                if self.sub.filter.matches(event):
                    page.append(event)
            if page:
                await hub.prepare(page)
                yield [event for event in page if event.graphql is not None]
            if len(entries) < REPLAY_PAGE:
                return

"""Stock events as read from the Redis stream, their filters, and stream-entry cursors.

A cursor is the stream entry id (``<ms>-<seq>``), so resuming is one ``XRANGE`` away and two
cursors compare like the tuples they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from quartermaster.errors import ApiError, InvalidCursorError

_CURSOR = re.compile(r"^(\d{1,20})-(\d{1,20})$")
_MAX_PART = 2**64 - 1

StreamId = tuple[int, int]


class CursorExpiredError(ApiError):
    """The events after the cursor were trimmed from the stream: the client must refetch."""

    code = "CURSOR_EXPIRED"


def parse_cursor(raw: str) -> StreamId:
    match = _CURSOR.match(raw)
    if match is None:
        raise InvalidCursorError(
            f"`after` is not a stockChanged cursor: {raw!r}.", argument="after"
        )
    ms, seq = int(match.group(1)), int(match.group(2))
    if ms > _MAX_PART or seq > _MAX_PART:
        raise InvalidCursorError(
            f"`after` is not a stockChanged cursor: {raw!r}.", argument="after"
        )
    return ms, seq


def format_cursor(stream_id: StreamId) -> str:
    return f"{stream_id[0]}-{stream_id[1]}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def stream_id(value: Any) -> StreamId:
    ms, _, seq = _text(value).partition("-")
    return int(ms), int(seq or 0)


@dataclass(eq=False, slots=True)
class StockEvent:
    """One ``stock.changed`` stream entry. Built once per entry and shared by every subscriber;
    ``rendered`` caches the serialized result per render group (see ``live/render.py``)."""

    id: StreamId
    cursor: str
    outbox_id: int
    occurred_at: datetime
    stock_level_id: int
    product_id: int
    warehouse_id: int
    reason: str
    on_hand_delta: int
    reserved_delta: int
    on_hand: int
    reserved: int
    low_stock_threshold: int
    order_id: int | None
    rendered: dict[Any, str] = field(default_factory=dict)
    #: The strawberry object (``StockChangeEvent``), built on first use.
    graphql: Any = None

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved

    @property
    def is_low(self) -> bool:
        # The same rule as StockLevel.isLow: available <= lowStockThreshold.
        return self.available <= self.low_stock_threshold


def parse_entry(entry_id: Any, fields: dict[Any, Any]) -> StockEvent | None:
    """The event of one stream entry; None for an entry that is not a well-formed stock event
    (logged by the caller and skipped rather than stopping the reader)."""
    try:
        get = {_text(k): v for k, v in fields.items()}
        payload = orjson.loads(get["payload"])
        sid = stream_id(entry_id)
        order_id = payload.get("order_id")
        return StockEvent(
            id=sid,
            cursor=format_cursor(sid),
            outbox_id=int(_text(get["outbox_id"])),
            occurred_at=datetime.fromisoformat(_text(get["occurred_at"])),
            stock_level_id=int(payload["stock_level_id"]),
            product_id=int(payload["product_id"]),
            warehouse_id=int(payload["warehouse_id"]),
            reason=str(payload["reason"]),
            on_hand_delta=int(payload["on_hand_delta"]),
            reserved_delta=int(payload["reserved_delta"]),
            on_hand=int(payload["on_hand"]),
            reserved=int(payload["reserved"]),
            low_stock_threshold=int(payload["low_stock_threshold"]),
            order_id=int(order_id) if order_id is not None else None,
        )
    except (KeyError, TypeError, ValueError, orjson.JSONDecodeError):
        return None


@dataclass(frozen=True, slots=True)
class EventFilter:
    """``stockChanged`` arguments, matched in memory against every event."""

    product_ids: frozenset[int] | None = None
    warehouse_ids: frozenset[int] | None = None
    only_low: bool = False

    def matches(self, event: StockEvent) -> bool:
        if self.product_ids is not None and event.product_id not in self.product_ids:
            return False
        if self.warehouse_ids is not None and event.warehouse_id not in self.warehouse_ids:
            return False
        return not self.only_low or event.is_low


def check_resumable(after: StreamId, info: dict[Any, Any] | None) -> None:
    """Raise ``CursorExpiredError`` when events after ``after`` may be gone from the stream.

    ``info`` is ``XINFO STREAM`` (None when the stream does not exist). Trimming removes the
    oldest entries, so a cursor at or after the first entry still there has lost nothing; an
    older one has (conservatively: the entries between it and the first one may have been
    trimmed, and neither Redis 6.2 nor 7 says whether there were any). Redis 7 also reports
    ``max-deleted-entry-id``, which catches entries removed with ``XDEL`` after the cursor.
    A cursor ahead of the last id the stream ever generated belongs to a stream that was
    reset (Redis lost its data): expired as well.
    """
    if info is None:
        if after != (0, 0):
            raise _expired()
        return
    info = {_text(k): v for k, v in info.items()}
    last = stream_id(info.get("last-generated-id") or "0-0")
    if after > last:
        raise _expired()
    deleted = info.get("max-deleted-entry-id")
    if deleted is not None and stream_id(deleted) > after:
        raise _expired()
    first = info.get("first-entry")
    if first is None:
        # Empty stream: anything generated after the cursor was trimmed.
        if after < last:
            raise _expired()
        return
    if after < stream_id(first[0]):
        raise _expired()


def _expired() -> CursorExpiredError:
    return CursorExpiredError(
        "Events after this cursor are no longer kept; query the current stock levels again "
        "and subscribe without `after`.",
        argument="after",
    )

"""Keyset (cursor) pagination for Relay connections.

A sort is a tuple of columns that always ends in the primary key, so the order is total and
ties (equal prices, equal timestamps) page correctly. A cursor is the opaque encoding of the
sort-key values of one row plus a tag naming the connection and sort it belongs to, so a cursor
from another connection or another ordering is refused instead of silently misused.

Pages never use OFFSET: ``after``/``before`` become a row-value comparison
``(price, id) > (:price, :id)`` that PostgreSQL answers from the matching index.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from sqlalchemy import (
    ARRAY,
    BigInteger,
    ColumnElement,
    Select,
    bindparam,
    func,
    select,
    true,
    tuple_,
)
from sqlalchemy.engine import Row

from quartermaster.db.replica import ReadSource
from quartermaster.errors import (
    InvalidCursorError,
    InvalidPaginationError,
    PageSizeExceededError,
)

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100


@dataclass(frozen=True)
class Sort:
    """An ordering of a connection: ``columns`` end with the primary key."""

    tag: str
    columns: tuple[Any, ...]
    descending: bool = False

    def order_by(self, reverse: bool = False) -> list[ColumnElement[Any]]:
        desc = self.descending != reverse
        return [c.desc() if desc else c.asc() for c in self.columns]

    def key_names(self) -> list[str]:
        return [c.key for c in self.columns]


@dataclass(frozen=True)
class PageArgs:
    """Validated Relay arguments."""

    first: int | None
    after: str | None
    last: int | None
    before: str | None

    @property
    def backward(self) -> bool:
        return self.last is not None

    @property
    def limit(self) -> int:
        size = self.last if self.backward else self.first
        assert size is not None
        return size

    @classmethod
    def parse(
        cls,
        first: int | None,
        after: str | None,
        last: int | None,
        before: str | None,
        default_size: int = DEFAULT_PAGE_SIZE,
        max_size: int = MAX_PAGE_SIZE,
    ) -> PageArgs:
        if first is not None and last is not None:
            raise InvalidPaginationError(
                "Pass either `first` (with `after`) or `last` (with `before`), not both."
            )
        for name, value in (("first", first), ("last", last)):
            if value is not None and value < 0:
                raise InvalidPaginationError(f"`{name}` must not be negative, got {value}.")
            if value is not None and value > max_size:
                raise PageSizeExceededError(
                    f"`{name}` may be at most {max_size}, got {value}. Page through the "
                    "connection with `after`/`before` instead.",
                    maxPageSize=max_size,
                )
        if first is None and last is None:
            if before is not None and after is None:
                last = default_size
            else:
                first = default_size
        return cls(first=first, after=after, last=last, before=before)


def _encode_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _decode_value(raw: Any, column: Any) -> Any:
    # A cursor is client input: refuse anything the column could not hold, so that a forged
    # cursor is INVALID_CURSOR and never a database error.
    python_type = column.type.python_type
    if python_type is int:
        if isinstance(raw, bool) or not isinstance(raw, int) or not -(2**63) <= raw < 2**63:
            raise ValueError("not a 64-bit integer")
        return raw
    if not isinstance(raw, str) or "\x00" in raw:
        raise ValueError("not a string PostgreSQL can hold")
    if python_type is Decimal:
        value = Decimal(raw)
        precision, scale = column.type.precision, column.type.scale or 0
        if not value.is_finite() or (precision and value.adjusted() >= precision - scale):
            raise ValueError("not a number this column can hold")
        return value
    if python_type is datetime:
        parsed = datetime.fromisoformat(raw)
        if parsed.tzinfo is None:
            raise ValueError("timestamp without offset")
        return parsed.astimezone(UTC)  # OverflowError at the ends of the calendar
    return raw


def encode_cursor(sort: Sort, row: Row[Any]) -> str:
    mapping = row._mapping
    values = [_encode_value(mapping[key]) for key in sort.key_names()]
    raw = orjson.dumps([sort.tag, *values])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(sort: Sort, cursor: str, argument: str) -> list[Any]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        payload = orjson.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise InvalidCursorError(
            f"`{argument}` is not a valid cursor. Use a cursor returned by this connection."
        ) from exc
    if not isinstance(payload, list) or not payload:
        raise InvalidCursorError(f"`{argument}` is not a valid cursor.")
    if payload[0] != sort.tag:
        raise InvalidCursorError(
            f"`{argument}` belongs to another connection or ordering; cursors are only valid "
            "for the connection and `orderBy` that produced them."
        )
    if len(payload) != len(sort.columns) + 1:
        raise InvalidCursorError(f"`{argument}` is not a valid cursor.")
    try:
        return [_decode_value(raw, col) for raw, col in zip(payload[1:], sort.columns, strict=True)]
    except (ValueError, InvalidOperation, OverflowError) as exc:
        raise InvalidCursorError(f"`{argument}` is not a valid cursor.") from exc


def _bounds(sort: Sort, args: PageArgs) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    key = tuple_(*sort.columns)
    if args.after is not None:
        values = tuple_(*decode_cursor(sort, args.after, "after"))
        conditions.append(key < values if sort.descending else key > values)
    if args.before is not None:
        values = tuple_(*decode_cursor(sort, args.before, "before"))
        conditions.append(key > values if sort.descending else key < values)
    return conditions


@dataclass
class Page:
    rows: list[Row[Any]]
    cursors: list[str]
    has_next_page: bool
    has_previous_page: bool


def _make_page(rows: Sequence[Row[Any]], sort: Sort, args: PageArgs) -> Page:
    limit = args.limit
    more = len(rows) > limit
    taken = list(rows[:limit])
    if args.backward:
        taken.reverse()
        has_next, has_previous = args.before is not None, more
    else:
        has_next, has_previous = more, args.after is not None
    return Page(
        rows=taken,
        cursors=[encode_cursor(sort, row) for row in taken],
        has_next_page=has_next,
        has_previous_page=has_previous,
    )


def page_statement(base: Select[Any], sort: Sort, args: PageArgs) -> Select[Any]:
    """``base`` narrowed to one page (plus one row that tells whether there is more)."""
    return (
        base.where(*_bounds(sort, args))
        .order_by(*sort.order_by(reverse=args.backward))
        .limit(args.limit + 1)
    )


async def fetch_page(reader: ReadSource, base: Select[Any], sort: Sort, args: PageArgs) -> Page:
    if args.limit == 0:
        _bounds(sort, args)  # still reject a bad cursor
        return Page([], [], False, False)
    async with reader.connect() as conn:
        rows = (await conn.execute(page_statement(base, sort, args))).all()
    return _make_page(rows, sort, args)


async def fetch_count(reader: ReadSource, base: Select[Any]) -> int:
    stmt = select(func.count()).select_from(base.order_by(None).subquery())
    async with reader.connect() as conn:
        return int((await conn.execute(stmt)).scalar_one())


async def fetch_pages_by_parent(
    reader: ReadSource,
    base: Select[Any],
    parent_column: Any,
    parent_ids: Sequence[int],
    sort: Sort,
    args: PageArgs,
) -> list[Page]:
    """One page per parent id in a single statement (``unnest`` + ``LATERAL``)."""
    if args.limit == 0:
        _bounds(sort, args)
        return [Page([], [], False, False) for _ in parent_ids]
    parents = select(
        func.unnest(bindparam("parent_ids", list(parent_ids), type_=ARRAY(BigInteger))).label(
            "parent_id"
        )
    ).subquery("parents")
    page = page_statement(base.where(parent_column == parents.c.parent_id), sort, args).lateral(
        "page"
    )
    direction_desc = sort.descending != args.backward
    inner_order = [
        page.c[k].desc() if direction_desc else page.c[k].asc() for k in sort.key_names()
    ]
    stmt = (
        select(parents.c.parent_id, page)
        .select_from(parents.join(page, true()))
        .order_by(parents.c.parent_id, *inner_order)
    )
    async with reader.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    grouped: dict[int, list[Row[Any]]] = {pid: [] for pid in parent_ids}
    for row in rows:
        grouped[row.parent_id].append(row)
    return [_make_page(grouped[pid], sort, args) for pid in parent_ids]


async def fetch_counts_by_parent(
    reader: ReadSource, base: Select[Any], parent_column: Any, parent_ids: Sequence[int]
) -> list[int]:
    stmt = (
        base.with_only_columns(parent_column, func.count())
        .where(parent_column.in_(list(parent_ids)))
        .group_by(parent_column)
        .order_by(None)
    )
    async with reader.connect() as conn:
        counts = {pid: n for pid, n in (await conn.execute(stmt)).all()}
    return [int(counts.get(pid, 0)) for pid in parent_ids]

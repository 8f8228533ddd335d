"""Relay connection types and the helpers that fill them from keyset pages."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import strawberry
from sqlalchemy import Select
from sqlalchemy.engine import Row

from quartermaster.context import Context
from quartermaster.db.loaders import table_name
from quartermaster.db.pagination import Page, PageArgs, Sort, fetch_count, fetch_page

T = TypeVar("T")


@strawberry.type(description="Where a page sits in its connection (Relay).")
class PageInfo:
    has_next_page: bool
    has_previous_page: bool
    start_cursor: str | None
    end_cursor: str | None


@strawberry.type(description="One node of a connection and the cursor that points at it.")
class Edge(Generic[T]):
    cursor: str
    node: T


@strawberry.type(
    description="A page of a list, with keyset cursors. `first`/`last` default to 20 and are "
    "capped at 100."
)
class Connection(Generic[T]):
    edges: list[Edge[T]]
    page_info: PageInfo
    count: strawberry.Private[Callable[[], Awaitable[int]]]

    @strawberry.field(description="Number of items in the whole list (runs a COUNT when asked).")
    async def total_count(self) -> int:
        return await self.count()


def page_args(
    context: Context, first: int | None, after: str | None, last: int | None, before: str | None
) -> PageArgs:
    default_size, max_size = context.page_sizes
    return PageArgs.parse(first, after, last, before, default_size, max_size)


def to_connection(
    page: Page, make_node: Callable[[Row[Any]], T], count: Callable[[], Awaitable[int]]
) -> Connection[T]:
    edges = [
        Edge(cursor=cursor, node=make_node(row))
        for row, cursor in zip(page.rows, page.cursors, strict=True)
    ]
    return Connection(
        edges=edges,
        page_info=PageInfo(
            has_next_page=page.has_next_page,
            has_previous_page=page.has_previous_page,
            start_cursor=page.cursors[0] if page.cursors else None,
            end_cursor=page.cursors[-1] if page.cursors else None,
        ),
        count=count,
    )


async def root_connection(
    context: Context,
    base: Select[Any],
    sort: Sort,
    args: PageArgs,
    make_node: Callable[[Row[Any]], T],
) -> Connection[T]:
    reader = context.reader
    # Only the rows this caller may read (policy.py): someone else's rows simply do not exist.
    base = context.scope(table_name(base), base)
    page = await fetch_page(reader, base, sort, args)

    async def count() -> int:
        return await fetch_count(reader, base)

    return to_connection(page, make_node, count)


async def nested_connection(
    context: Context,
    name: str,
    parent_id: int,
    base: Select[Any],
    parent_column: Any,
    sort: Sort,
    args: PageArgs,
    make_node: Callable[[Row[Any]], T],
    spec: object = None,
) -> Connection[T]:
    """A connection under a parent (``Customer.orders``): pages of all parents in one batch."""
    loaders = context.loaders
    page = await loaders.page_by_parent(name, base, parent_column, sort, args, spec).load(parent_id)
    counter = loaders.count_by_parent(name, base, parent_column, spec)

    async def count() -> int:
        return await counter.load(parent_id)

    return to_connection(page, make_node, count)

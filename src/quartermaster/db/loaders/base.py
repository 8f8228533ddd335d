"""Generic batch loaders over Core tables (ORM row loading is ~7x slower and not needed)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from aiodataloader import DataLoader
from sqlalchemy import ColumnElement, Select
from sqlalchemy.engine import Row

from quartermaster.db.pagination import (
    Page,
    PageArgs,
    Sort,
    fetch_counts_by_parent,
    fetch_pages_by_parent,
)
from quartermaster.db.replica import ReadSource


async def fetch_rows(reader: ReadSource, stmt: Select[Any]) -> Sequence[Row[Any]]:
    async with reader.connect() as conn:
        return (await conn.execute(stmt)).all()


#: Turns a row into whatever the caller wants to hold (the schema passes its types' from_row).
Convert = Callable[[Row[Any]], Any]


def _identity(row: Row[Any]) -> Any:
    return row


class OneByKeyLoader(DataLoader[Hashable, Any]):
    """``key -> converted row`` (or ``None``) for a unique column, in key order."""

    def __init__(
        self,
        reader: ReadSource,
        stmt: Select[Any],
        column: ColumnElement[Any],
        batch: bool = True,
        convert: Convert | None = None,
    ) -> None:
        super().__init__(batch=batch)
        self.reader = reader
        self.stmt = stmt
        self.column = column
        self.convert = convert or _identity

    async def batch_load_fn(self, keys: list[Hashable]) -> list[Any]:
        stmt = self.stmt.where(self.column.in_(keys))
        rows = await fetch_rows(self.reader, stmt)
        convert = self.convert
        by_key = {row._mapping[self.column]: convert(row) for row in rows}
        return [by_key.get(key) for key in keys]


class ManyByKeyLoader(DataLoader[int, list[Any]]):
    """``parent id -> [converted rows]`` for a foreign key, each list in ``order_by`` order."""

    def __init__(
        self,
        reader: ReadSource,
        stmt: Select[Any],
        column: ColumnElement[Any],
        order_by: Sequence[ColumnElement[Any]],
        batch: bool = True,
        convert: Convert | None = None,
    ) -> None:
        super().__init__(batch=batch)
        self.reader = reader
        self.stmt = stmt
        self.column = column
        self.order = list(order_by)
        self.convert = convert or _identity

    async def batch_load_fn(self, keys: list[int]) -> list[list[Any]]:
        stmt = self.stmt.where(self.column.in_(keys)).order_by(*self.order)
        grouped: dict[Any, list[Any]] = defaultdict(list)
        convert = self.convert
        for row in await fetch_rows(self.reader, stmt):
            grouped[row._mapping[self.column]].append(convert(row))
        return [grouped.get(key, []) for key in keys]


class PageByParentLoader(DataLoader[int, Page]):
    """``parent id -> Page`` of a nested connection: all parents in one LATERAL statement."""

    def __init__(
        self,
        reader: ReadSource,
        base: Select[Any],
        parent_column: ColumnElement[Any],
        sort: Sort,
        args: PageArgs,
        batch: bool = True,
    ) -> None:
        super().__init__(batch=batch)
        self.reader = reader
        self.base = base
        self.parent_column = parent_column
        self.sort = sort
        self.args = args

    async def batch_load_fn(self, keys: list[int]) -> list[Page]:
        return await fetch_pages_by_parent(
            self.reader, self.base, self.parent_column, keys, self.sort, self.args
        )


class CountByParentLoader(DataLoader[int, int]):
    """``parent id -> row count`` of a nested connection (only when totalCount is selected)."""

    def __init__(
        self,
        reader: ReadSource,
        base: Select[Any],
        parent_column: ColumnElement[Any],
        batch: bool = True,
    ) -> None:
        super().__init__(batch=batch)
        self.reader = reader
        self.base = base
        self.parent_column = parent_column

    async def batch_load_fn(self, keys: list[int]) -> list[int]:
        return await fetch_counts_by_parent(self.reader, self.base, self.parent_column, keys)

"""Read one row back inside a write transaction (what a mutation's payload starts from)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncConnection

from quartermaster.db.models.base import Base
from quartermaster.db.repositories.order import orders
from quartermaster.db.repositories.product import products
from quartermaster.db.repositories.quotation import quotations
from quartermaster.db.repositories.stock import stock_levels, stock_levels_with_warehouse

_BY_ID: dict[str, tuple[Select[Any], Any]] = {
    "orders": (select(orders), orders.c.id),
    "quotations": (select(quotations), quotations.c.id),
    "products": (select(products), products.c.id),
    "stock_levels": (stock_levels_with_warehouse(), stock_levels.c.id),
}


async def fetch_row(conn: AsyncConnection, table: str, pk: int) -> Any:
    """The row as this transaction sees it (the state the mutation made)."""
    stmt, column = _BY_ID[table]
    return (await conn.execute(stmt.where(column == pk))).one()


async def row_visible(
    conn: AsyncConnection,
    table: str,
    pk: int,
    scope: Callable[[str, Select[Any]], Select[Any]],
) -> bool:
    """Does row ``pk`` of ``table`` exist within ``scope`` (the caller's readable rows)?"""
    target = Base.metadata.tables[table]
    stmt = scope(table, select(target.c.id).where(target.c.id == pk))
    return (await conn.execute(stmt)).first() is not None

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Select,
    Table,
    bindparam,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from quartermaster.db.models import StockAllocation, StockLevel, StockMovement
from quartermaster.db.pagination import Sort
from quartermaster.db.repositories.warehouse import warehouse_columns, warehouses

stock_levels = cast(Table, StockLevel.__table__)
allocations = cast(Table, StockAllocation.__table__)
movements = cast(Table, StockMovement.__table__)

STOCK_LEVEL_SORT = Sort(tag="stockLevels:id", columns=(stock_levels.c.id,))
WAREHOUSE_STOCK_SORT = Sort(tag="warehouse.stockLevels:id", columns=(stock_levels.c.id,))


@dataclass(frozen=True)
class StockLevelFilterSpec:
    product_ids: list[int] | None = None
    warehouse_ids: list[int] | None = None
    only_low: bool = False


def is_low() -> ColumnElement[bool]:
    """Matches the partial index ``ix_stock_levels_low``."""
    return stock_levels.c.on_hand - stock_levels.c.reserved <= stock_levels.c.low_stock_threshold


def stock_levels_with_warehouse() -> Select[Any]:
    """Stock levels carry their (small) warehouse row, so `warehouse` needs no extra await."""
    return select(stock_levels, *warehouse_columns()).select_from(
        stock_levels.join(warehouses, warehouses.c.id == stock_levels.c.warehouse_id)
    )


def allocations_with_warehouse() -> Select[Any]:
    return select(allocations, *warehouse_columns()).select_from(
        allocations.join(warehouses, warehouses.c.id == allocations.c.warehouse_id)
    )


def select_stock_levels(spec: StockLevelFilterSpec | None) -> Select[Any]:
    stmt = stock_levels_with_warehouse()
    if spec is None:
        return stmt
    if spec.product_ids is not None:
        stmt = stmt.where(stock_levels.c.product_id.in_(spec.product_ids))
    if spec.warehouse_ids is not None:
        stmt = stmt.where(stock_levels.c.warehouse_id.in_(spec.warehouse_ids))
    if spec.only_low:
        stmt = stmt.where(is_low())
    return stmt


# -- writes: every change goes through these, rows locked in (product_id, warehouse_id) order


# A fixed statement (an array parameter, not an expanding IN list): compiled once, one prepared
# statement whatever the number of products; it sits on the hot path of every order.
_LOCK_LEVELS_OF_PRODUCTS = text(
    f"SELECT {', '.join(c.name for c in stock_levels.c)} FROM stock_levels "
    "WHERE product_id = ANY(CAST(:ids AS bigint[])) "
    "ORDER BY product_id, warehouse_id FOR UPDATE"
).columns(*stock_levels.c)


async def lock_levels_of_products(conn: AsyncConnection, product_ids: list[int]) -> list[Row[Any]]:
    """Lock every stock level of these products, in the one global order."""
    result = await conn.execute(_LOCK_LEVELS_OF_PRODUCTS, {"ids": sorted(set(product_ids))})
    return list(result.all())


async def lock_levels(conn: AsyncConnection, level_ids: list[int]) -> list[Row[Any]]:
    stmt = (
        select(stock_levels)
        .where(stock_levels.c.id.in_(sorted(set(level_ids))))
        .order_by(stock_levels.c.product_id, stock_levels.c.warehouse_id)
        .with_for_update()
    )
    return list((await conn.execute(stmt)).all())


async def lock_or_create_level(
    conn: AsyncConnection, product_id: int, warehouse_id: int
) -> Row[Any]:
    await conn.execute(
        pg_insert(stock_levels)
        .values(product_id=product_id, warehouse_id=warehouse_id, on_hand=0, reserved=0,
                low_stock_threshold=10)
        .on_conflict_do_nothing(index_elements=["product_id", "warehouse_id"])
    )  # fmt: skip
    stmt = (
        select(stock_levels)
        .where(stock_levels.c.product_id == product_id)
        .where(stock_levels.c.warehouse_id == warehouse_id)
        .with_for_update()
    )
    return (await conn.execute(stmt)).one()


async def apply_level_deltas(conn: AsyncConnection, changes: list[dict[str, Any]]) -> None:
    """``changes``: dicts with ``level_id``, ``on_hand_delta``, ``reserved_delta`` (rows locked).

    Written as expressions, never as computed values, and the CHECK constraint stays the last
    line of defence against overselling.
    """
    if not changes:
        return
    stmt = (
        update(stock_levels)
        .where(stock_levels.c.id == bindparam("level_id"))
        .values(
            on_hand=stock_levels.c.on_hand + bindparam("on_hand_delta"),
            reserved=stock_levels.c.reserved + bindparam("reserved_delta"),
            updated_at=func.now(),
        )
    )
    await conn.execute(stmt, changes)


async def set_threshold(conn: AsyncConnection, level_id: int, threshold: int) -> None:
    await conn.execute(
        update(stock_levels)
        .where(stock_levels.c.id == level_id)
        .values(low_stock_threshold=threshold, updated_at=func.now())
    )


async def insert_movements(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    if rows:
        await conn.execute(insert(movements), rows)


async def allocations_of_order(conn: AsyncConnection, order_id: int) -> list[Any]:
    """Allocations of an order's lines with the stock level they were taken from."""
    from quartermaster.db.repositories.order import order_lines

    stmt = (
        select(
            allocations.c.quantity,
            allocations.c.warehouse_id,
            order_lines.c.product_id,
            stock_levels.c.id.label("level_id"),
        )
        .select_from(
            allocations.join(order_lines, order_lines.c.id == allocations.c.order_line_id).join(
                stock_levels,
                (stock_levels.c.product_id == order_lines.c.product_id)
                & (stock_levels.c.warehouse_id == allocations.c.warehouse_id),
            )
        )
        .where(order_lines.c.order_id == order_id)
        .order_by(order_lines.c.product_id, allocations.c.warehouse_id)
    )
    return list((await conn.execute(stmt)).all())


async def warehouse_exists(conn: AsyncConnection, warehouse_id: int) -> bool:
    stmt = select(warehouses.c.id).where(warehouses.c.id == warehouse_id)
    return (await conn.execute(stmt)).first() is not None

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Select,
    Table,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from quartermaster.db.driver import DriverStatement
from quartermaster.db.models import StockAllocation, StockLevel, StockMovement
from quartermaster.db.pagination import Sort
from quartermaster.db.repositories.warehouse import warehouse_columns, warehouses
from quartermaster.enums import CustomerTier

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
_LOCK_LEVELS_OF_PRODUCTS = DriverStatement(
    text(
        f"SELECT {', '.join(c.name for c in stock_levels.c)} FROM stock_levels "
        "WHERE product_id = ANY(CAST(:ids AS bigint[])) "
        "ORDER BY product_id, warehouse_id FOR UPDATE"
    )
)


async def lock_levels_of_products(conn: AsyncConnection, product_ids: list[int]) -> list[Any]:
    """Lock every stock level of these products, in the one global order (hot path: on the
    driver connection, ``db/driver.py``); rows with the table's column names as attributes."""
    records = await _LOCK_LEVELS_OF_PRODUCTS.fetch(conn, {"ids": sorted(set(product_ids))})
    return [SimpleNamespace(**dict(r)) for r in records]


async def lock_levels(conn: AsyncConnection, level_ids: list[int]) -> list[Row[Any]]:
    stmt = (
        select(stock_levels)
        .where(stock_levels.c.id.in_(sorted(set(level_ids))))
        .order_by(stock_levels.c.product_id, stock_levels.c.warehouse_id)
        .with_for_update()
    )
    return list((await conn.execute(stmt)).all())


# placeOrder's first round trip: the customer, the lines' products and every stock level of
# those products, locked in the one global order. The levels come from a CTE (locked in its
# ORDER BY order as it is read) appended to the customer/product rows; ``kind`` tells them apart.
_ORDER_CONTEXT = DriverStatement(
    text(
        """
WITH locked AS MATERIALIZED (
  SELECT id, product_id, warehouse_id, on_hand, reserved, low_stock_threshold
  FROM stock_levels WHERE product_id = ANY(CAST(:ids AS bigint[]))
  ORDER BY product_id, warehouse_id FOR UPDATE)
SELECT 'p' AS kind, c.id AS customer_id, c.tier, p.id, p.unit_price, p.currency, p.active,
       NULL::bigint AS product_id, NULL::bigint AS warehouse_id, NULL::int AS on_hand,
       NULL::int AS reserved, NULL::int AS low_stock_threshold
FROM customers AS c LEFT OUTER JOIN products AS p ON p.id = ANY(CAST(:ids AS bigint[]))
WHERE c.id = :customer_id
UNION ALL
SELECT 'l', NULL, NULL, id, NULL, NULL, NULL, product_id, warehouse_id, on_hand, reserved,
       low_stock_threshold
FROM locked
"""
    )
)


async def order_context(
    conn: AsyncConnection, customer_id: int, product_ids: list[int]
) -> tuple[Any, dict[int, Any], list[Any]]:
    """The customer (or None), the products among ``product_ids`` and their stock levels, the
    levels locked in the one global order: one round trip (hot path, ``db/driver.py``)."""
    ids = sorted(set(product_ids))
    records = await _ORDER_CONTEXT.fetch(conn, {"customer_id": customer_id, "ids": ids})
    customer: Any = None
    products: dict[int, Any] = {}
    levels: list[Any] = []
    for r in records:
        if r["kind"] == "l":
            levels.append(
                SimpleNamespace(
                    id=r["id"], product_id=r["product_id"], warehouse_id=r["warehouse_id"],
                    on_hand=r["on_hand"], reserved=r["reserved"],
                    low_stock_threshold=r["low_stock_threshold"],
                )
            )  # fmt: skip
            continue
        customer = SimpleNamespace(customer_id=r["customer_id"], tier=CustomerTier(r["tier"]))
        if r["id"] is not None:
            products[r["id"]] = SimpleNamespace(
                id=r["id"], unit_price=r["unit_price"], currency=r["currency"], active=r["active"]
            )
    return customer, products, levels


# Creates the level when it is missing and locks it either way, in one statement: the no-op
# DO UPDATE takes the row lock that a plain ON CONFLICT DO NOTHING would not.
_LOCK_OR_CREATE_LEVEL = text(
    "INSERT INTO stock_levels (product_id, warehouse_id, on_hand, reserved, low_stock_threshold) "
    "VALUES (:product_id, :warehouse_id, 0, 0, 10) "
    "ON CONFLICT (product_id, warehouse_id) DO UPDATE SET product_id = EXCLUDED.product_id "
    f"RETURNING {', '.join(c.name for c in stock_levels.c)}"
).columns(*stock_levels.c)


async def lock_or_create_level(
    conn: AsyncConnection, product_id: int, warehouse_id: int
) -> Row[Any]:
    params = {"product_id": product_id, "warehouse_id": warehouse_id}
    return (await conn.execute(_LOCK_OR_CREATE_LEVEL, params)).one()


_PRODUCT_AND_WAREHOUSE_EXIST = text(
    "SELECT EXISTS (SELECT 1 FROM products WHERE id = :product_id) AS product, "
    "EXISTS (SELECT 1 FROM warehouses WHERE id = :warehouse_id) AS warehouse"
)


async def product_and_warehouse_exist(
    conn: AsyncConnection, product_id: int, warehouse_id: int
) -> tuple[bool, bool]:
    """Whether the product and the warehouse exist: one round trip."""
    params = {"product_id": product_id, "warehouse_id": warehouse_id}
    row = (await conn.execute(_PRODUCT_AND_WAREHOUSE_EXIST, params)).one()
    return bool(row.product), bool(row.warehouse)


# Every change of stock levels in one statement: the deltas as expressions on the locked rows
# (the CHECK constraint stays the last line of defence), one ledger row each, and one
# ``stock.changed`` outbox event each, built from the levels as the UPDATE left them.
_RECORD_CHANGES_SQL = text(
    """
WITH x AS (
  SELECT * FROM unnest(CAST(:level_ids AS bigint[]), CAST(:on_hand_deltas AS int[]),
                       CAST(:reserved_deltas AS int[]), CAST(:reasons AS text[]),
                       CAST(:order_ids AS bigint[]))
    WITH ORDINALITY AS x(level_id, on_hand_delta, reserved_delta, reason, order_id, ord)),
u AS (
  UPDATE stock_levels AS sl
  SET on_hand = sl.on_hand + x.on_hand_delta, reserved = sl.reserved + x.reserved_delta,
      updated_at = now()
  FROM x WHERE sl.id = x.level_id
  RETURNING sl.id, sl.product_id, sl.warehouse_id, sl.on_hand, sl.reserved,
            sl.low_stock_threshold, x.on_hand_delta, x.reserved_delta, x.reason, x.order_id,
            x.ord),
m AS (
  INSERT INTO stock_movements (stock_level_id, reason, on_hand_delta, reserved_delta, order_id)
  SELECT level_id, reason, on_hand_delta, reserved_delta, order_id FROM x ORDER BY ord),
e AS (
  INSERT INTO outbox (topic, key, payload)
  SELECT 'stock.changed', 'stock_level:' || u.id,
         jsonb_build_object('stock_level_id', u.id, 'product_id', u.product_id,
                            'warehouse_id', u.warehouse_id, 'reason', u.reason,
                            'on_hand_delta', u.on_hand_delta,
                            'reserved_delta', u.reserved_delta, 'on_hand', u.on_hand,
                            'reserved', u.reserved, 'low_stock_threshold', u.low_stock_threshold,
                            'order_id', u.order_id)
  FROM u ORDER BY u.ord)
SELECT count(*) FROM u
"""
)


async def record_level_changes(conn: AsyncConnection, changes: list[dict[str, Any]]) -> int:
    """``changes``: dicts with ``level_id`` (locked, each at most once), ``on_hand_delta``,
    ``reserved_delta``, ``reason`` and ``order_id``. Returns how many levels changed."""
    if not changes:
        return 0
    params = {
        "level_ids": [c["level_id"] for c in changes],
        "on_hand_deltas": [c["on_hand_delta"] for c in changes],
        "reserved_deltas": [c["reserved_delta"] for c in changes],
        "reasons": [c["reason"] for c in changes],
        "order_ids": [c["order_id"] for c in changes],
    }
    return int((await conn.execute(_RECORD_CHANGES_SQL, params)).scalar_one())


async def set_threshold(conn: AsyncConnection, level_id: int, threshold: int) -> None:
    await conn.execute(
        update(stock_levels)
        .where(stock_levels.c.id == level_id)
        .values(low_stock_threshold=threshold, updated_at=func.now())
    )


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

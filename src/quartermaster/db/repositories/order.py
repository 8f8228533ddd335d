from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace
from typing import Any, cast

from sqlalchemy import Select, Table, func, select, text, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from quartermaster.db.driver import DriverStatement
from quartermaster.db.models import Order, OrderLine
from quartermaster.db.pagination import Sort
from quartermaster.enums import OrderStatus

orders = cast(Table, Order.__table__)
order_lines = cast(Table, OrderLine.__table__)

SORT_COLUMNS = {
    "CREATED_AT": orders.c.created_at,
    "NUMBER": orders.c.number,
    "TOTAL": orders.c.total,
}


@dataclass(frozen=True)
class OrderFilterSpec:
    statuses: list[OrderStatus] | None = None
    customer_id: int | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


def order_sort(field: str, descending: bool, scope: str = "orders") -> Sort:
    return Sort(
        tag=f"{scope}:{field}:{'desc' if descending else 'asc'}",
        columns=(SORT_COLUMNS[field], orders.c.id),
        descending=descending,
    )


def select_orders(spec: OrderFilterSpec | None) -> Select[Any]:
    stmt = select(orders)
    if spec is None:
        return stmt
    if spec.statuses is not None:
        stmt = stmt.where(orders.c.status.in_(spec.statuses))
    if spec.customer_id is not None:
        stmt = stmt.where(orders.c.customer_id == spec.customer_id)
    if spec.created_after is not None:
        stmt = stmt.where(orders.c.created_at >= spec.created_after)
    if spec.created_before is not None:
        stmt = stmt.where(orders.c.created_at < spec.created_before)
    return stmt


# -- writes


async def find_by_idempotency_key(conn: AsyncConnection, key: str) -> Any:
    stmt = select(orders.c.id, orders.c.request_hash).where(orders.c.idempotency_key == key)
    return (await conn.execute(stmt)).first()


async def lock_idempotency_key(conn: AsyncConnection, key: str) -> None:
    """Serialise requests with the same key until this transaction ends."""
    await conn.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(key, 7))))


async def lock_order(conn: AsyncConnection, order_id: int) -> Row[Any] | None:
    stmt = select(orders).where(orders.c.id == order_id).with_for_update()
    return (await conn.execute(stmt)).first()


async def set_status(
    conn: AsyncConnection, order_id: int, status: OrderStatus, **extra: Any
) -> None:
    await conn.execute(
        update(orders)
        .where(orders.c.id == order_id)
        .values(status=status, updated_at=func.now(), **extra)
    )


# Every write of a placed order in one statement (one round trip, one prepared statement): the
# order, its lines, the allocations, the stock-level updates (expressions on rows the caller has
# locked), the RESERVATION ledger rows and the outbox events.
_PLACE_ORDER = DriverStatement(
    text(
        """
WITH o AS (
  INSERT INTO orders (id, number, customer_id, status, currency, subtotal, discount_total, total,
                      quotation_id, idempotency_key, request_hash)
  SELECT n.id, 'SO-' || lpad(n.id::text, greatest(6, length(n.id::text)), '0'), :customer_id,
         'PENDING', :currency, :subtotal, :discount_total, :total, :quotation_id,
         :idempotency_key, :request_hash
  FROM (SELECT nextval(pg_get_serial_sequence('orders', 'id')) AS id) AS n
  RETURNING *),
l AS (
  INSERT INTO order_lines (order_id, product_id, quantity, unit_price, discount, line_total)
  SELECT o.id, u.product_id, u.quantity, u.unit_price, u.discount, u.line_total
  FROM o, unnest(CAST(:line_products AS bigint[]), CAST(:line_quantities AS int[]),
                 CAST(:line_prices AS numeric[]), CAST(:line_discounts AS numeric[]),
                 CAST(:line_totals AS numeric[]))
          AS u(product_id, quantity, unit_price, discount, line_total)
  RETURNING id, product_id),
x AS (
  SELECT * FROM unnest(CAST(:alloc_levels AS bigint[]), CAST(:alloc_products AS bigint[]),
                       CAST(:alloc_warehouses AS bigint[]), CAST(:alloc_quantities AS int[]))
          AS x(level_id, product_id, warehouse_id, quantity)),
a AS (
  INSERT INTO stock_allocations (order_line_id, warehouse_id, quantity)
  SELECT l.id, x.warehouse_id, x.quantity FROM x JOIN l ON l.product_id = x.product_id),
s AS (
  UPDATE stock_levels AS sl SET reserved = sl.reserved + x.quantity, updated_at = now()
  FROM x WHERE sl.id = x.level_id
  RETURNING sl.id, sl.product_id, sl.warehouse_id, sl.on_hand, sl.reserved,
            sl.low_stock_threshold, x.quantity),
m AS (
  INSERT INTO stock_movements (stock_level_id, reason, on_hand_delta, reserved_delta, order_id)
  SELECT x.level_id, 'RESERVATION', 0, x.quantity, o.id FROM o, x),
e AS (
  INSERT INTO outbox (topic, key, payload)
  SELECT 'order.placed', 'order:' || o.id,
         jsonb_build_object('order_id', o.id, 'number', o.number, 'customer_id', o.customer_id,
                            'total', o.total::text, 'currency', o.currency,
                            'quotation_id', o.quotation_id)
  FROM o
  UNION ALL
  SELECT 'stock.changed', 'stock_level:' || s.id,
         jsonb_build_object('stock_level_id', s.id, 'product_id', s.product_id,
                            'warehouse_id', s.warehouse_id, 'reason', 'RESERVATION',
                            'on_hand_delta', 0, 'reserved_delta', s.quantity,
                            'on_hand', s.on_hand, 'reserved', s.reserved,
                            'low_stock_threshold', s.low_stock_threshold, 'order_id', o.id)
  FROM s, o)
SELECT * FROM o
"""
    )
)


async def insert_reserved_order(conn: AsyncConnection, params: dict[str, Any]) -> Any:
    """Run ``_PLACE_ORDER`` (hot path: on the driver connection, ``db/driver.py``); returns
    the new order row, with the table's column names as attributes."""
    (record,) = await _PLACE_ORDER.fetch(conn, params)
    row = SimpleNamespace(**dict(record))
    row.status = OrderStatus(row.status)
    return row

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from types import SimpleNamespace
from typing import Any, cast

from sqlalchemy import Select, Table, exists, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from quartermaster.db.driver import DriverStatement
from quartermaster.db.models import Product, StockLevel
from quartermaster.db.pagination import Sort
from quartermaster.db.repositories import escape_like
from quartermaster.enums import CustomerTier

products = cast(Table, Product.__table__)
stock_levels = cast(Table, StockLevel.__table__)

SORT_COLUMNS = {
    "NAME": products.c.name,
    "SKU": products.c.sku,
    "PRICE": products.c.unit_price,
    "CREATED_AT": products.c.created_at,
}


@dataclass(frozen=True)
class ProductFilterSpec:
    search: str | None = None
    category: str | None = None
    skus: list[str] | None = None
    active: bool | None = None
    min_price: Decimal | None = None
    max_price: Decimal | None = None
    in_stock: bool | None = None


def product_sort(field: str, descending: bool) -> Sort:
    return Sort(
        tag=f"products:{field}:{'desc' if descending else 'asc'}",
        columns=(SORT_COLUMNS[field], products.c.id),
        descending=descending,
    )


def select_products(spec: ProductFilterSpec | None) -> Select[Any]:
    stmt = select(products)
    if spec is None:
        return stmt
    if spec.search:
        pattern = f"%{escape_like(spec.search)}%"
        stmt = stmt.where(
            or_(
                products.c.name.ilike(pattern, escape="\\"),
                products.c.sku.ilike(pattern, escape="\\"),
            )
        )
    if spec.category is not None:
        stmt = stmt.where(products.c.category == spec.category)
    if spec.skus is not None:
        stmt = stmt.where(products.c.sku.in_(spec.skus))
    if spec.active is not None:
        stmt = stmt.where(products.c.active.is_(spec.active))
    if spec.min_price is not None:
        stmt = stmt.where(products.c.unit_price >= spec.min_price)
    if spec.max_price is not None:
        stmt = stmt.where(products.c.unit_price <= spec.max_price)
    if spec.in_stock is not None:
        available = exists().where(
            stock_levels.c.product_id == products.c.id,
            stock_levels.c.on_hand - stock_levels.c.reserved > 0,
        )
        stmt = stmt.where(available if spec.in_stock else ~available)
    return stmt


async def insert_product(conn: AsyncConnection, values: dict[str, Any]) -> int | None:
    """Insert a product; ``None`` when the SKU is taken."""
    stmt = (
        pg_insert(products)
        .values(**values)
        .on_conflict_do_nothing(index_elements=[products.c.sku])
        .returning(products.c.id)
    )
    return (await conn.execute(stmt)).scalar_one_or_none()


async def update_product(conn: AsyncConnection, product_id: int, values: dict[str, Any]) -> bool:
    stmt = (
        update(products)
        .where(products.c.id == product_id)
        .values(**values, updated_at=func.now())
        .returning(products.c.id)
    )
    return (await conn.execute(stmt)).scalar_one_or_none() is not None


async def customer_and_products(
    conn: AsyncConnection, customer_id: int, product_ids: list[int]
) -> tuple[Any, dict[int, Any]]:
    """The customer (or None) and the products for sale among ``product_ids``: one round trip
    (hot path: on the driver connection, ``db/driver.py``)."""
    records = await _CUSTOMER_AND_PRODUCTS.fetch(
        conn, {"customer_id": customer_id, "ids": product_ids}
    )
    if not records:
        return None, {}
    rows = [SimpleNamespace(**dict(r)) for r in records]
    for row in rows:
        row.tier = CustomerTier(row.tier)
    return rows[0], {row.id: row for row in rows if row.id is not None}


# Fixed text with an array parameter: compiled once, one prepared statement (hot path).
_CUSTOMER_AND_PRODUCTS = DriverStatement(
    text(
        "SELECT c.id AS customer_id, c.tier, p.id, p.unit_price, p.currency, p.active "
        "FROM customers AS c LEFT OUTER JOIN products AS p "
        "ON p.id = ANY(CAST(:ids AS bigint[])) WHERE c.id = :customer_id"
    )
)

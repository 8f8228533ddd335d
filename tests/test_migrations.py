"""The alembic migration is reversible and creates the constraints the data model promises."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import pytest

from quartermaster.db.migrate import downgrade, upgrade
from tests.conftest import asyncpg_kwargs

TABLES = {
    "customers", "warehouses", "products", "stock_levels", "stock_movements", "orders",
    "order_lines", "stock_allocations", "quotations", "quotation_lines", "integration_jobs",
    "outbox",
}  # fmt: skip


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(**asyncpg_kwargs(url))
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {r["tablename"] for r in rows} - {"alembic_version"}
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def scratch_url(scratch_database: Callable[[str], str]) -> str:
    return scratch_database("migrate")


def test_upgrade_downgrade_upgrade(scratch_url: str) -> None:
    upgrade(scratch_url)
    assert asyncio.run(_tables(scratch_url)) == TABLES
    downgrade(scratch_url, "base")
    assert asyncio.run(_tables(scratch_url)) == set()
    upgrade(scratch_url)
    assert asyncio.run(_tables(scratch_url)) == TABLES


async def test_constraints_and_indexes(db: asyncpg.Pool) -> None:
    checks = {
        r["conname"]: r["def"]
        for r in await db.fetch(
            "SELECT conname, pg_get_constraintdef(oid) AS def "
            "FROM pg_constraint WHERE contype = 'c'"
        )
    }
    assert (
        "(0 <= reserved) AND (reserved <= on_hand)"
        in checks["ck_stock_levels_reserved_within_on_hand"]
    )
    indexes = {
        r["indexname"]: r["indexdef"]
        for r in await db.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname='public'"
        )
    }
    assert "WHERE ((on_hand - reserved) <= low_stock_threshold)" in indexes["ix_stock_levels_low"]
    for name in (
        "ix_products_unit_price_id", "ix_products_created_at_id", "ix_products_name_id",
        "ix_orders_created_at_id", "ix_orders_total_id", "ix_orders_customer_id_created_at_id",
        "ix_orders_status", "ix_quotations_customer_id_created_at_id",
        "ix_stock_levels_warehouse_id_id", "ix_order_lines_order_id_id",
        "uq_stock_levels_product_id_warehouse_id", "uq_products_sku", "uq_orders_number",
    ):  # fmt: skip
        assert name in indexes, name
    money = await db.fetch(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE column_name IN ('unit_price', 'subtotal', 'total', 'discount_total', 'line_total')"
    )
    assert money and all(r["data_type"] == "numeric" for r in money)
    stamps = await db.fetch(
        "SELECT data_type FROM information_schema.columns "
        "WHERE table_schema = 'public' AND column_name LIKE '%\\_at' ESCAPE '\\'"
    )
    assert stamps and {r["data_type"] for r in stamps} == {"timestamp with time zone"}


async def test_check_constraint_refuses_overselling(db: asyncpg.Pool) -> None:
    level = await db.fetchrow("SELECT id, on_hand FROM stock_levels LIMIT 1")
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(
            "UPDATE stock_levels SET reserved = $2 + 1 WHERE id = $1", level["id"], level["on_hand"]
        )

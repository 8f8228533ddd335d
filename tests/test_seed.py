"""`quartermaster seed`: the same random seed gives the same rows, another seed other rows, and
the data is consistent (reserved stock = open orders' allocations, some levels low, statuses
that fit together). Small scale, three fresh databases, seeded through the command itself."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import pytest
from click.testing import CliRunner

from quartermaster.cli import main
from quartermaster.db.migrate import upgrade
from quartermaster.db.seed import COLUMNS, check_invariants
from tests.conftest import asyncpg_kwargs

SCALE = ["--products", "50", "--warehouses", "3", "--customers", "10", "--orders", "40"]
SCALE += ["--quotations", "10"]
SEEDS = {"first": 3, "again": 3, "other": 4}  # database -> --random-seed

ORDER_STATUSES = {"PENDING", "CONFIRMED", "FULFILLED", "CANCELLED"}
QUOTATION_STATUSES = {"DRAFT", "SENT", "ACCEPTED", "REJECTED", "EXPIRED"}
OPEN = "('PENDING', 'CONFIRMED')"


@pytest.fixture(scope="module")
def seeded(scratch_database: Callable[[str], str]) -> Iterator[dict[str, str]]:
    """Database URL per entry of SEEDS, each fresh, migrated and seeded by `quartermaster seed`."""
    urls: dict[str, str] = {}
    for name, random_seed in SEEDS.items():
        url = scratch_database(f"seed_{name}")
        upgrade(url)
        result = CliRunner().invoke(
            main,
            ["seed", *SCALE, "--random-seed", str(random_seed)],
            env={"QM_DATABASE_URL": url},
        )
        assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
        assert "seeded: " in result.output
        urls[name] = url
    yield urls


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def table_rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every seeded table's rows (the columns the seed writes), by id."""
    conn = await asyncpg.connect(**asyncpg_kwargs(url))
    try:
        rows = {}
        for table, columns in COLUMNS.items():
            select = ", ".join(columns.split())
            records = await conn.fetch(f"SELECT {select} FROM {table} ORDER BY id")
            rows[table] = [tuple(r) for r in records]
        return rows
    finally:
        await conn.close()


async def fetch(url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(**asyncpg_kwargs(url))
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


def test_same_random_seed_gives_identical_rows(seeded: dict[str, str]) -> None:
    first, again = run(table_rows(seeded["first"])), run(table_rows(seeded["again"]))
    assert set(first) >= {"customers", "products", "orders", "order_lines", "stock_levels"}
    for table, rows in first.items():
        assert rows, f"{table} is empty"
        assert again[table] == rows, table


def test_another_random_seed_gives_other_data(seeded: dict[str, str]) -> None:
    first, other = run(table_rows(seeded["first"])), run(table_rows(seeded["other"]))
    # Same scale, so the same number of customers and products, but not the same ones.
    assert len(other["customers"]) == len(first["customers"]) == 10
    assert len(other["products"]) == len(first["products"]) == 50
    for table in ("customers", "products", "orders", "order_lines", "stock_levels"):
        assert other[table] != first[table], table
    skus = {row[1] for row in first["products"]}
    assert skus != {row[1] for row in other["products"]}


@pytest.mark.parametrize("name", ["first", "other"])
def test_seeded_data_is_consistent(seeded: dict[str, str], name: str) -> None:
    url = seeded[name]
    assert run(check_invariants(url)) == []
    # The same rule checked here without the seed module's SQL: per stock level, reserved is
    # the sum of the allocations of open orders from that level's warehouse for its product.
    levels = run(
        fetch(
            url,
            f"""
            SELECT sl.id, sl.on_hand, sl.reserved, sl.low_stock_threshold,
                   coalesce((SELECT sum(sa.quantity) FROM stock_allocations sa
                             JOIN order_lines ol ON ol.id = sa.order_line_id
                             JOIN orders o ON o.id = ol.order_id
                             WHERE o.status IN {OPEN} AND ol.product_id = sl.product_id
                               AND sa.warehouse_id = sl.warehouse_id), 0) AS allocated
            FROM stock_levels sl ORDER BY sl.id""",
        )
    )
    assert levels
    assert [(r["id"], r["reserved"]) for r in levels] == [(r["id"], r["allocated"]) for r in levels]
    assert any(r["reserved"] > 0 for r in levels), "no open order reserves stock"
    assert all(0 <= r["reserved"] <= r["on_hand"] for r in levels)
    low = [r for r in levels if r["on_hand"] - r["reserved"] <= r["low_stock_threshold"]]
    assert 0 < len(low) < len(levels), f"{len(low)} of {len(levels)} levels are low"

    orders = run(fetch(url, "SELECT * FROM orders"))
    assert {o["status"] for o in orders} <= ORDER_STATUSES
    assert {"PENDING", "CONFIRMED", "FULFILLED"} <= {o["status"] for o in orders}
    assert all(o["updated_at"] >= o["created_at"] for o in orders)
    assert all((o["cancel_reason"] is not None) == (o["status"] == "CANCELLED") for o in orders)
    cancelled_allocations = run(
        fetch(
            url,
            "SELECT sa.id FROM stock_allocations sa JOIN order_lines ol ON ol.id = sa.order_line_id"
            " JOIN orders o ON o.id = ol.order_id WHERE o.status = 'CANCELLED'",
        )
    )
    assert cancelled_allocations == [], "a cancelled order still holds stock"

    quotations = {q["id"]: q for q in run(fetch(url, "SELECT * FROM quotations"))}
    assert {q["status"] for q in quotations.values()} <= QUOTATION_STATUSES
    # An order made from a quotation: the quotation was accepted, by the same customer, before.
    from_quotes = [o for o in orders if o["quotation_id"] is not None]
    for order in from_quotes:
        quotation = quotations[order["quotation_id"]]
        assert quotation["status"] == "ACCEPTED", order["number"]
        assert quotation["customer_id"] == order["customer_id"], order["number"]
        assert quotation["created_at"] < order["created_at"], order["number"]
    accepted = {q for q, row in quotations.items() if row["status"] == "ACCEPTED"}
    assert accepted, "no accepted quotation to check"
    assert sorted(o["quotation_id"] for o in from_quotes) == sorted(accepted)

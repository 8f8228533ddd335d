"""Shared set-up of the write-path tests: documents, SQL helpers, input builders and the
`world` fixture (see test_write_validation.py and test_write_rules.py)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import asyncpg
import httpx
import pytest_asyncio

from quartermaster.schema.node import decode_any_id, encode_id
from tests.conftest import gql

Json = dict[str, Any]

# ---------------------------------------------------------------- documents

ERRORS = "errors { code message field }"
LEVEL = "id onHand reserved available lowStockThreshold isLow warehouse { id code } product { id }"
ORDER = """
    id number status currency subtotal discountTotal total
    customer { id }
    quotation { id number }
    lines {
      id quantity unitPrice discount lineTotal
      product { id availableQuantity stock { onHand reserved available warehouse { id } } }
      allocations { quantity warehouse { id code } }
    }
"""
QUOTATION = """
    id number status currency subtotal discountTotal total validUntil
    customer { id }
    order { id number status }
    lines { id quantity unitPrice discountPercent lineTotal product { id } }
"""


def _doc(name: str, input_type: str, thing: str, fields: str) -> str:
    return (
        f"mutation Write($input: {input_type}!) {{"
        f" {name}(input: $input) {{ {thing} {{ {fields} }} {ERRORS} }} }}"
    )


_PAYLOADS = {
    "placeOrder": ("PlaceOrderInput", "order", ORDER),
    "confirmOrder": ("OrderIdInput", "order", ORDER),
    "cancelOrder": ("CancelOrderInput", "order", ORDER),
    "fulfillOrder": ("OrderIdInput", "order", ORDER),
    "adjustStock": ("AdjustStockInput", "stockLevel", LEVEL),
    "createQuotation": ("CreateQuotationInput", "quotation", QUOTATION),
    "updateQuotation": ("UpdateQuotationInput", "quotation", QUOTATION),
    "sendQuotation": ("QuotationIdInput", "quotation", QUOTATION),
    "rejectQuotation": ("QuotationIdInput", "quotation", QUOTATION),
    "acceptQuotation": ("AcceptQuotationInput", "order", ORDER),
}
#: mutation name -> (document, name of the payload's object field)
MUTATIONS = {
    name: (_doc(name, input_type, thing, fields), thing)
    for name, (input_type, thing, fields) in _PAYLOADS.items()
}

NODE_STATUS = """
query Status($id: ID!) {
  node(id: $id) {
    ... on Order { orderStatus: status }
    ... on Quotation { quotationStatus: status order { id } }
  }
}
"""


async def mutate(client: httpx.AsyncClient, name: str, input: Json) -> Json:
    document, _ = MUTATIONS[name]
    body = await gql(client, document, {"input": input})
    payload: Json = body["data"][name]
    return payload


async def succeed(client: httpx.AsyncClient, name: str, input: Json) -> Json:
    payload = await mutate(client, name, input)
    assert payload["errors"] == [], (name, input, payload["errors"])
    thing: Json = payload[MUTATIONS[name][1]]
    assert thing is not None
    return thing


def problems(payload: Json) -> list[tuple[str, list[str] | None]]:
    for error in payload["errors"]:
        assert isinstance(error["message"], str) and error["message"].strip(), error
    return [(e["code"], e["field"]) for e in payload["errors"]]


def assert_rejected(payload: Json, name: str, code: str, field: list[str]) -> None:
    assert payload[MUTATIONS[name][1]] is None, payload
    assert problems(payload) == [(code, field)], payload["errors"]


async def status_of(client: httpx.AsyncClient, global_id: str) -> str:
    node = (await gql(client, NODE_STATUS, {"id": global_id}))["data"]["node"]
    status: str = node.get("orderStatus") or node["quotationStatus"]
    return status


def pk(global_id: str) -> int:
    return decode_any_id(global_id)[1]


def money(value: str | Decimal) -> Decimal:
    return Decimal(value).quantize(Decimal("0.01"), ROUND_HALF_UP)


TIER_PERCENT = {"STANDARD": 0, "SILVER": 3, "GOLD": 5, "PLATINUM": 8}


# ---------------------------------------------------------------- SQL set-up and checks


def unique(prefix: str, length: int = 12) -> str:
    return f"{prefix}{uuid.uuid4().hex[:length]}"


async def new_customer(db: asyncpg.Pool, tier: str) -> int:
    email = f"{unique('writes-')}@example.test"
    customer_id: int = await db.fetchval(
        "INSERT INTO customers (name, email, tier) VALUES ($1, $2, $3) RETURNING id",
        f"Write test {tier.title()}",
        email,
        tier,
    )
    return customer_id


async def new_warehouse(db: asyncpg.Pool) -> int:
    warehouse_id: int = await db.fetchval(
        "INSERT INTO warehouses (code, name) VALUES ($1, 'Write test warehouse') RETURNING id",
        unique("W", 12),
    )
    return warehouse_id


async def new_product(
    db: asyncpg.Pool,
    *,
    price: str = "10.00",
    currency: str = "EUR",
    active: bool = True,
    stock: dict[int, int] | None = None,
) -> int:
    """A product with one stock level (and its RECEIPT movement) per ``stock`` entry."""
    async with db.acquire() as conn, conn.transaction():
        product_id: int = await conn.fetchval(
            "INSERT INTO products (sku, name, unit_price, currency, active)"
            " VALUES ($1, 'Write test product', $2, $3, $4) RETURNING id",
            unique("WT-", 20),
            Decimal(price),
            currency,
            active,
        )
        for warehouse_id, on_hand in (stock or {}).items():
            level_id = await conn.fetchval(
                "INSERT INTO stock_levels (product_id, warehouse_id, on_hand, reserved,"
                " low_stock_threshold) VALUES ($1, $2, $3, 0, 0) RETURNING id",
                product_id,
                warehouse_id,
                on_hand,
            )
            await conn.execute(
                "INSERT INTO stock_movements (stock_level_id, reason, on_hand_delta,"
                " reserved_delta, note) VALUES ($1, 'RECEIPT', $2, 0, 'write test set-up')",
                level_id,
                on_hand,
            )
    return product_id


async def levels(db: asyncpg.Pool, product_id: int) -> dict[int, tuple[int, int]]:
    """warehouse id -> (on_hand, reserved) of a product."""
    rows = await db.fetch(
        "SELECT warehouse_id, on_hand, reserved FROM stock_levels WHERE product_id = $1",
        product_id,
    )
    return {r["warehouse_id"]: (r["on_hand"], r["reserved"]) for r in rows}


SNAPSHOT_TABLES = (
    "orders",
    "order_lines",
    "stock_allocations",
    "stock_movements",
    "quotations",
    "quotation_lines",
    "stock_levels",
    "products",
)


async def snapshot(db: asyncpg.Pool) -> dict[str, object]:
    """Everything a mutation could write, reduced to numbers that any write changes."""
    out: dict[str, object] = {}
    for table in SNAPSHOT_TABLES:
        row = await db.fetchrow(f"SELECT count(*) AS n, coalesce(max(id), 0) AS top FROM {table}")
        out[table] = (row["n"], row["top"])
    # A relay may mark outbox rows published (or delete them): only a new id counts as a write.
    out["outbox"] = await db.fetchval("SELECT coalesce(max(id), 0) FROM outbox")
    out["stock"] = tuple(
        await db.fetchrow(
            "SELECT sum(on_hand), sum(reserved), sum(low_stock_threshold), max(updated_at)"
            " FROM stock_levels"
        )
    )
    out["orders_changed"] = await db.fetchval("SELECT max(updated_at) FROM orders")
    out["order_statuses"] = await db.fetchval(
        "SELECT md5(string_agg(id || status, ',' ORDER BY id)) FROM orders"
    )
    out["quotations_changed"] = await db.fetchval("SELECT max(updated_at) FROM quotations")
    out["quotation_statuses"] = await db.fetchval(
        "SELECT md5(string_agg(id || status || valid_until, ',' ORDER BY id)) FROM quotations"
    )
    return out


async def outbox_rows(db: asyncpg.Pool, topic: str, order_id: int) -> list[Json]:
    rows = await db.fetch(
        "SELECT payload FROM outbox WHERE topic = $1 AND payload->>'order_id' = $2 ORDER BY id",
        topic,
        str(order_id),
    )
    return [json.loads(r["payload"]) for r in rows]


def loose(value: object) -> str:
    """JSON payload values compared without caring whether ids went out as numbers or strings."""
    return str(value)


# ---------------------------------------------------------------- fixtures


@dataclass
class World:
    customers: dict[str, int]  # tier -> pk
    warehouses: list[int]  # three fresh warehouses, ascending ids
    eur: int  # active EUR products with plenty of stock
    eur2: int
    usd: int
    inactive: int
    scarce: int  # 3 units in one warehouse
    bulk: list[int]  # 101 active EUR products, 10 units each
    draft: int  # a DRAFT quotation (inserted by SQL, no lines)

    def customer(self, tier: str = "STANDARD") -> str:
        return encode_id("Customer", self.customers[tier])

    def product(self, product: int | str) -> str:
        """Global id of a product pk; a string (a raw id under test) passes through."""
        return product if isinstance(product, str) else encode_id("Product", product)

    def warehouse(self, warehouse: int | str) -> str:
        """Global id of ``warehouses[index]``; a string passes through."""
        if isinstance(warehouse, str):
            return warehouse
        return encode_id("Warehouse", self.warehouses[warehouse])


@pytest_asyncio.fixture(scope="module")
async def world(db: asyncpg.Pool) -> World:
    customers = {tier: await new_customer(db, tier) for tier in TIER_PERCENT}
    warehouses = sorted([await new_warehouse(db) for _ in range(3)])
    w0, w1, _ = warehouses
    prefix = unique("WB-", 12)
    async with db.acquire() as conn, conn.transaction():
        bulk = [
            r["id"]
            for r in await conn.fetch(
                "INSERT INTO products (sku, name, unit_price, currency)"
                " SELECT $1 || '-' || g, 'Write test bulk ' || g, 1.00, 'EUR'"
                " FROM generate_series(1, 101) g RETURNING id",
                prefix,
            )
        ]
        await conn.execute(
            "INSERT INTO stock_levels (product_id, warehouse_id, on_hand, reserved,"
            " low_stock_threshold) SELECT unnest($1::bigint[]), $2, 10, 0, 0",
            bulk,
            w0,
        )
        await conn.execute(
            "INSERT INTO stock_movements (stock_level_id, reason, on_hand_delta, reserved_delta)"
            " SELECT id, 'RECEIPT', 10, 0 FROM stock_levels WHERE product_id = ANY($1::bigint[])",
            bulk,
        )
    draft = await db.fetchval(
        "INSERT INTO quotations (number, customer_id, status, currency, subtotal,"
        " discount_total, total, valid_until) VALUES ($1, $2, 'DRAFT', 'EUR', 0, 0, 0,"
        " now() + interval '10 days') RETURNING id",
        unique("QT-T", 16),
        customers["STANDARD"],
    )
    return World(
        customers=customers,
        warehouses=warehouses,
        eur=await new_product(db, price="10.00", stock={w0: 50}),
        eur2=await new_product(db, price="5.00", stock={w1: 50}),
        usd=await new_product(db, price="7.00", currency="USD", stock={w0: 50}),
        inactive=await new_product(db, active=False, stock={w0: 50}),
        scarce=await new_product(db, price="3.00", stock={w1: 3}),
        bulk=bulk,
        draft=draft,
    )


# ---------------------------------------------------------------- rejected input writes nothing

MISSING = 2**62  # a well-formed primary key that no row has
INVALID, NOT_FOUND, STOCK = "INVALID_INPUT", "NOT_FOUND", "INSUFFICIENT_STOCK"


def order_input(w: World, *lines: tuple[int | str, int], **extra: Any) -> Json:
    return {
        "customerId": w.customer(),
        "lines": [{"productId": w.product(p), "quantity": q} for p, q in lines],
        **extra,
    }


def quote_lines(w: World, *lines: tuple[Any, ...]) -> list[Json]:
    """Lines from (product, quantity) or (product, quantity, discountPercent) tuples."""
    out = []
    for product, quantity, *discount in lines:
        line: Json = {"productId": w.product(product), "quantity": quantity}
        if discount:
            line["discountPercent"] = discount[0]
        out.append(line)
    return out


def quote_input(w: World, *lines: tuple[Any, ...], **extra: Any) -> Json:
    return {"customerId": w.customer(), "lines": quote_lines(w, *lines), **extra}


def adjust_input(
    w: World, product: int | str, warehouse: int | str, delta: int, **extra: Any
) -> Json:
    return {
        "productId": w.product(product),
        "warehouseId": w.warehouse(warehouse),
        "delta": delta,
        **extra,
    }


def past() -> str:
    return (datetime.now(UTC) - timedelta(minutes=5)).isoformat()


def future(days: int = 7) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).isoformat()


# The case table names products by World attribute ("eur") and passes raw ids as "=<id>".
Builder = Callable[[World], Json]


def raw(global_id: str) -> str:
    return "=" + global_id


def resolve(w: World, ref: str | int) -> str | int:
    if isinstance(ref, int):
        return ref
    return ref[1:] if ref.startswith("=") else int(getattr(w, ref))


def place(*lines: tuple[str, int], customer: str = "STANDARD", **extra: Any) -> Builder:
    def build(w: World) -> Json:
        body = order_input(w, *((resolve(w, p), q) for p, q in lines), **extra)
        body["customerId"] = customer[1:] if customer.startswith("=") else w.customer(customer)
        return body

    return build


def quote(*lines: tuple[Any, ...], customer: str = "STANDARD", **extra: Any) -> Builder:
    def build(w: World) -> Json:
        body = quote_input(w, *((resolve(w, p), *rest) for p, *rest in lines), **extra)
        body["customerId"] = customer[1:] if customer.startswith("=") else w.customer(customer)
        return body

    return build


def update(*lines: tuple[Any, ...], **extra: Any) -> Builder:
    def build(w: World) -> Json:
        body: Json = {"quotationId": encode_id("Quotation", w.draft), **extra}
        if lines:
            body["lines"] = quote_lines(w, *((resolve(w, p), *rest) for p, *rest in lines))
        return body

    return build


def adjust(product: str, warehouse: int | str, delta: int, **extra: Any) -> Builder:
    return lambda w: adjust_input(w, resolve(w, product), resolve(w, warehouse), delta, **extra)


def by_id(key: str, global_id: str) -> Builder:
    return lambda w: {key: global_id}


def all_bulk(w: World) -> Json:
    """101 lines: one past the limit (valid for placeOrder and createQuotation alike)."""
    return {"customerId": w.customer(), "lines": quote_lines(w, *((p, 1) for p in w.bulk))}

"""The write path's rules (/tmp/qm-write-spec.md) over ASGI, checked against SQL.

Every test creates the products (and, where it matters, warehouses and customers) it touches,
so nothing here depends on the seed. Failed mutations must write nothing at all: each such case
compares a snapshot of every written table (ids, counts and stock sums) before and after.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio

from quartermaster.db.seed import check_invariants
from tests.conftest import gql
from tests.write_support import (
    ERRORS,
    INVALID,
    LEVEL,
    NODE_STATUS,
    ORDER,
    STOCK,
    TIER_PERCENT,
    World,
    adjust_input,
    assert_rejected,
    future,
    levels,
    loose,
    money,
    mutate,
    new_product,
    order_input,
    outbox_rows,
    pk,
    quote_input,
    snapshot,
    status_of,
    succeed,
    unique,
)

Json = dict[str, Any]

# ---------------------------------------------------------------- placing orders


def expected_order_line(quantity: int, price: str, tier: str) -> tuple[str, str, str]:
    """(unitPrice, discount, lineTotal) per the spec's tier pricing."""
    gross = quantity * Decimal(price)
    discount = money(gross * TIER_PERCENT[tier] / 100)
    return str(money(price)), str(discount), str(money(gross - discount))


@pytest.mark.parametrize(
    ("tier", "first_discount"),
    [("STANDARD", "0.00"), ("SILVER", "1.80"), ("GOLD", "3.00"), ("PLATINUM", "4.80")],
)
async def test_place_order_prices_with_the_tier_discount(
    client: httpx.AsyncClient, db: asyncpg.Pool, world: World, tier: str, first_discount: str
) -> None:
    w0, w1, _ = world.warehouses
    a = await new_product(db, price="19.99", stock={w0: 10})
    b = await new_product(db, price="0.35", stock={w1: 20})
    c = await new_product(db, price="1234.56", stock={w1: 2})
    lines = [(a, 3, "19.99"), (b, 7, "0.35"), (c, 2, "1234.56")]
    order = await succeed(
        client,
        "placeOrder",
        {
            "customerId": world.customer(tier),
            "lines": [{"productId": world.product(p), "quantity": q} for p, q, _ in lines],
        },
    )
    assert order["status"] == "PENDING"
    assert order["currency"] == "EUR"
    assert re.fullmatch(r"SO-\d{6,}", order["number"]), order["number"]
    assert order["customer"] == {"id": world.customer(tier)}
    assert order["quotation"] is None
    got = [(ln["unitPrice"], ln["discount"], ln["lineTotal"]) for ln in order["lines"]]
    expected = [expected_order_line(q, price, tier) for _, q, price in lines]
    assert got == expected
    assert got[0][1] == first_discount
    subtotal = sum(q * Decimal(price) for _, q, price in lines)
    discount = sum(Decimal(d) for _, d, _ in expected)
    assert order["subtotal"] == str(money(subtotal))
    assert order["discountTotal"] == str(money(discount))
    assert order["total"] == str(money(subtotal - discount))
    assert Decimal(order["total"]) == sum(Decimal(t) for _, _, t in expected)
    row = await db.fetchrow(
        "SELECT subtotal, discount_total, total, status FROM orders WHERE id = $1",
        pk(order["id"]),
    )
    assert [str(row["subtotal"]), str(row["discount_total"]), str(row["total"])] == [
        order["subtotal"],
        order["discountTotal"],
        order["total"],
    ]


@pytest.mark.parametrize(
    ("tier", "price", "discount"),
    [
        ("GOLD", "10.50", "0.53"),  # 0.525: half-even would give 0.52
        ("SILVER", "1.50", "0.05"),  # 0.045: half-even would give 0.04
        ("GOLD", "0.10", "0.01"),  # 0.005
        ("SILVER", "0.16", "0.00"),  # 0.0048
    ],
)
async def test_place_order_rounds_the_discount_half_up(
    client: httpx.AsyncClient, db: asyncpg.Pool, world: World, tier: str, price: str, discount: str
) -> None:
    product = await new_product(db, price=price, stock={world.warehouses[0]: 5})
    order = await succeed(
        client,
        "placeOrder",
        {
            "customerId": world.customer(tier),
            "lines": [{"productId": world.product(product), "quantity": 1}],
        },
    )
    line = order["lines"][0]
    assert (line["unitPrice"], line["discount"]) == (price, discount)
    assert line["lineTotal"] == str(Decimal(price) - Decimal(discount))
    assert order["discountTotal"] == discount


async def test_place_order_reserves_writes_movements_and_outbox_and_returns_the_fresh_graph(
    client: httpx.AsyncClient, db: asyncpg.Pool, world: World
) -> None:
    w0, w1, w2 = world.warehouses
    a = await new_product(db, price="2.00", stock={w0: 4, w1: 6})
    b = await new_product(db, price="3.00", stock={w2: 9})
    order = await succeed(
        client,
        "placeOrder",
        order_input(world, (a, 8), (b, 2)),
    )
    order_id = pk(order["id"])
    line_a, line_b = order["lines"]
    # Fresh graph: the payload already shows the reservation it made.
    assert {x["warehouse"]["id"]: x["quantity"] for x in line_a["allocations"]} == {
        world.warehouse(1): 6,
        world.warehouse(0): 2,
    }
    assert [(pk(x["warehouse"]["id"]), x["quantity"]) for x in line_b["allocations"]] == [(w2, 2)]
    assert {
        s["warehouse"]["id"]: (s["onHand"], s["reserved"], s["available"])
        for s in line_a["product"]["stock"]
    } == {
        world.warehouse(0): (4, 2, 2),
        world.warehouse(1): (6, 6, 0),
    }
    assert line_a["product"]["availableQuantity"] == 2
    assert line_b["product"]["availableQuantity"] == 7
    assert await levels(db, a) == {w0: (4, 2), w1: (6, 6)}
    assert await levels(db, b) == {w2: (9, 2)}

    allocations = await db.fetch(
        "SELECT ol.product_id, sa.warehouse_id, sa.quantity FROM stock_allocations sa"
        " JOIN order_lines ol ON ol.id = sa.order_line_id WHERE ol.order_id = $1",
        order_id,
    )
    assert sorted(tuple(r) for r in allocations) == sorted([(a, w0, 2), (a, w1, 6), (b, w2, 2)])
    movements = await db.fetch(
        "SELECT sl.product_id, sl.warehouse_id, m.reason, m.on_hand_delta, m.reserved_delta"
        " FROM stock_movements m JOIN stock_levels sl ON sl.id = m.stock_level_id"
        " WHERE m.order_id = $1",
        order_id,
    )
    assert sorted(tuple(r) for r in movements) == sorted(
        [(a, w0, "RESERVATION", 0, 2), (a, w1, "RESERVATION", 0, 6), (b, w2, "RESERVATION", 0, 2)]
    )

    placed = await outbox_rows(db, "order.placed", order_id)
    assert len(placed) == 1
    assert loose(placed[0]["number"]) == order["number"]
    assert loose(placed[0]["customer_id"]) == loose(world.customers["STANDARD"])
    changed = await outbox_rows(db, "stock.changed", order_id)
    level_ids = {
        (r["product_id"], r["warehouse_id"]): r["id"]
        for r in await db.fetch(
            "SELECT id, product_id, warehouse_id FROM stock_levels"
            " WHERE product_id = ANY($1::bigint[])",
            [a, b],
        )
    }
    expected_events = {
        (a, w0): (2, 4, 2),
        (a, w1): (6, 6, 6),
        (b, w2): (2, 9, 2),
    }
    assert len(changed) == len(expected_events), changed
    for event in changed:
        key = (int(event["product_id"]), int(event["warehouse_id"]))
        reserved_delta, on_hand, reserved = expected_events[key]
        assert loose(event["stock_level_id"]) == loose(level_ids[key])
        assert event["reason"] == "RESERVATION"
        assert (int(event["on_hand_delta"]), int(event["reserved_delta"])) == (0, reserved_delta)
        assert (int(event["on_hand"]), int(event["reserved"])) == (on_hand, reserved)
    assert {(int(e["product_id"]), int(e["warehouse_id"])) for e in changed} == set(expected_events)

    # One transaction: order, lines, movements and (still unpublished) outbox rows share an xmin.
    xmins = {
        r["x"]
        for r in await db.fetch(
            "SELECT xmin::text AS x FROM orders WHERE id = $1"
            " UNION SELECT xmin::text FROM order_lines WHERE order_id = $1"
            " UNION SELECT xmin::text FROM stock_movements WHERE order_id = $1"
            " UNION SELECT xmin::text FROM outbox WHERE published_at IS NULL"
            "   AND payload->>'order_id' = $2",
            order_id,
            str(order_id),
        )
    }
    assert len(xmins) == 1, xmins


async def test_place_order_boundaries_100_lines_and_10000_units_and_200_char_key(
    client: httpx.AsyncClient, db: asyncpg.Pool, world: World
) -> None:
    order = await succeed(
        client, "placeOrder", order_input(world, *((p, 1) for p in world.bulk[:100]))
    )
    assert len(order["lines"]) == 100
    big = await new_product(
        db, price="0.01", stock={world.warehouses[0]: 6000, world.warehouses[1]: 4000}
    )
    order = await succeed(
        client, "placeOrder", order_input(world, (big, 10_000), idempotencyKey="k" * 200)
    )
    assert order["lines"][0]["quantity"] == 10_000
    assert sorted(x["quantity"] for x in order["lines"][0]["allocations"]) == [4000, 6000]
    assert await levels(db, big) == {
        world.warehouses[0]: (6000, 6000),
        world.warehouses[1]: (4000, 4000),
    }


async def test_allocation_takes_the_fullest_warehouse_first_and_splits_only_when_needed(
    client: httpx.AsyncClient, db: asyncpg.Pool, world: World
) -> None:
    w0, w1, w2 = world.warehouses  # ascending ids: w1 wins the tie with w2
    product = await new_product(db, stock={w0: 5, w1: 8, w2: 8})

    async def place(quantity: int) -> dict[int, int]:
        order = await succeed(client, "placeOrder", order_input(world, (product, quantity)))
        (line,) = order["lines"]
        allocated = {pk(x["warehouse"]["id"]): x["quantity"] for x in line["allocations"]}
        assert sum(allocated.values()) == quantity
        return allocated

    assert await place(6) == {w1: 6}  # tie 8/8 -> lower id; one warehouse covers it: no split
    assert await place(4) == {w2: 4}  # available 5/2/8 -> the fullest alone covers it
    assert await place(6) == {w0: 5, w2: 1}  # 5/2/4: nobody covers 6 -> 5 from w0, then w2
    assert await place(2) == {w2: 2}  # 0/2/3 -> w2 (3) before w1 (2)
    assert await place(3) == {w1: 2, w2: 1}  # 0/2/1 -> everything left
    assert await levels(db, product) == {w0: (5, 5), w1: (8, 8), w2: (8, 8)}
    before = await snapshot(db)
    payload = await mutate(client, "placeOrder", order_input(world, (product, 1)))
    assert_rejected(payload, "placeOrder", STOCK, ["lines", "0", "quantity"])
    assert await snapshot(db) == before


async def test_available_stock_is_summed_over_warehouses(
    client: httpx.AsyncClient, db: asyncpg.Pool, world: World
) -> None:
    w0, w1, w2 = world.warehouses
    product = await new_product(db, stock={w0: 3, w1: 4, w2: 5})
    before = await snapshot(db)
    payload = await mutate(client, "placeOrder", order_input(world, (product, 13)))
    assert_rejected(payload, "placeOrder", STOCK, ["lines", "0", "quantity"])
    assert await snapshot(db) == before
    order = await succeed(client, "placeOrder", order_input(world, (product, 12)))
    assert {pk(x["warehouse"]["id"]): x["quantity"] for x in order["lines"][0]["allocations"]} == {
        w0: 3,
        w1: 4,
        w2: 5,
    }


async def test_idempotency_key_returns_the_first_order_and_refuses_other_input(
    client: httpx.AsyncClient, db: asyncpg.Pool, world: World
) -> None:
    a = await new_product(db, stock={world.warehouses[0]: 20})
    b = await new_product(db, stock={world.warehouses[1]: 20})
    key = unique("idem-", 32)
    first = await succeed(
        client, "placeOrder", order_input(world, (a, 2), (b, 3), idempotencyKey=key)
    )
    again = await succeed(
        client, "placeOrder", order_input(world, (b, 3), (a, 2), idempotencyKey=key)
    )
    assert (again["id"], again["number"]) == (first["id"], first["number"])
    assert await db.fetchval("SELECT count(*) FROM orders WHERE idempotency_key = $1", key) == 1
    assert await levels(db, a) == {world.warehouses[0]: (20, 2)}
    before = await snapshot(db)
    for other in (
        order_input(world, (a, 2), (b, 4), idempotencyKey=key),
        order_input(world, (a, 2), idempotencyKey=key),
        {
            **order_input(world, (a, 2), (b, 3), idempotencyKey=key),
            "customerId": world.customer("GOLD"),
        },
    ):
        payload = await mutate(client, "placeOrder", other)
        assert_rejected(payload, "placeOrder", "CONFLICT", ["idempotencyKey"])
    assert await snapshot(db) == before


async def test_a_refused_request_does_not_use_up_its_idempotency_key(
    client: httpx.AsyncClient, db: asyncpg.Pool, world: World
) -> None:
    product = await new_product(db, stock={world.warehouses[0]: 2})
    key = unique("retry-", 24)
    payload = await mutate(
        client, "placeOrder", order_input(world, (product, 3), idempotencyKey=key)
    )
    assert_rejected(payload, "placeOrder", STOCK, ["lines", "0", "quantity"])
    await succeed(client, "adjustStock", adjust_input(world, product, 0, 1, reason="RECEIPT"))
    order = await succeed(
        client, "placeOrder", order_input(world, (product, 3), idempotencyKey=key)
    )
    assert await db.fetchval("SELECT id FROM orders WHERE idempotency_key = $1", key) == pk(
        order["id"]
    )


MULTI = f"""
mutation Two($first: PlaceOrderInput!, $second: PlaceOrderInput!, $adjust: AdjustStockInput!) {{
  first: placeOrder(input: $first) {{ order {{ {ORDER} }} {ERRORS} }}
  second: placeOrder(input: $second) {{ order {{ {ORDER} }} {ERRORS} }}
  adjust: adjustStock(input: $adjust) {{ stockLevel {{ {LEVEL} }} {ERRORS} }}
}}"""


async def test_each_mutation_of_a_document_sees_the_writes_before_it(
    client: httpx.AsyncClient, db: asyncpg.Pool, world: World
) -> None:
    product = await new_product(db, stock={world.warehouses[0]: 10})
    body = await gql(
        client,
        MULTI,
        {
            "first": order_input(world, (product, 2)),
            "second": order_input(world, (product, 3)),
            "adjust": adjust_input(world, product, 0, 4, reason="RECEIPT"),
        },
    )
    data = body["data"]
    first = data["first"]["order"]["lines"][0]["product"]
    second = data["second"]["order"]["lines"][0]["product"]
    assert (first["stock"][0]["reserved"], first["availableQuantity"]) == (2, 8)
    assert (second["stock"][0]["reserved"], second["availableQuantity"]) == (5, 5)
    level = data["adjust"]["stockLevel"]
    assert (level["onHand"], level["reserved"], level["available"]) == (14, 5, 9)


# ---------------------------------------------------------------- order transitions


async def test_cancel_releases_every_allocation_and_keeps_them_as_history(
    client: httpx.AsyncClient, db: asyncpg.Pool, world: World, database_url: str
) -> None:
    w0, w1, _ = world.warehouses
    a = await new_product(db, stock={w0: 3, w1: 2})
    b = await new_product(db, stock={w1: 5})
    for confirm_first in (False, True):
        order = await succeed(client, "placeOrder", order_input(world, (a, 4), (b, 1)))
        order_id = pk(order["id"])
        if confirm_first:
            assert (await succeed(client, "confirmOrder", {"orderId": order["id"]}))[
                "status"
            ] == "CONFIRMED"
        assert await levels(db, a) == {w0: (3, 3), w1: (2, 1)}
        cancelled = await succeed(
            client, "cancelOrder", {"orderId": order["id"], "reason": "customer changed mind"}
        )
        assert cancelled["status"] == "CANCELLED"
        # the payload shows the released stock; the allocations stay as history
        stock_a = {
            s["warehouse"]["id"]: s["reserved"] for s in cancelled["lines"][0]["product"]["stock"]
        }
        assert stock_a == {world.warehouse(0): 0, world.warehouse(1): 0}
        assert sum(x["quantity"] for x in cancelled["lines"][0]["allocations"]) == 4
        assert await levels(db, a) == {w0: (3, 0), w1: (2, 0)}
        assert await levels(db, b) == {w1: (5, 0)}
        row = await db.fetchrow("SELECT status, cancel_reason FROM orders WHERE id = $1", order_id)
        assert tuple(row) == ("CANCELLED", "customer changed mind")
        assert (
            await db.fetchval(
                "SELECT count(*) FROM stock_allocations sa"
                " JOIN order_lines ol ON ol.id = sa.order_line_id"
                " WHERE ol.order_id = $1",
                order_id,
            )
            == 3
        )
        released = await db.fetch(
            "SELECT sl.product_id, sl.warehouse_id, m.on_hand_delta, m.reserved_delta"
            " FROM stock_movements m JOIN stock_levels sl ON sl.id = m.stock_level_id"
            " WHERE m.order_id = $1 AND m.reason = 'RELEASE'",
            order_id,
        )
        assert sorted(tuple(r) for r in released) == sorted(
            [(a, w0, 0, -3), (a, w1, 0, -1), (b, w1, 0, -1)]
        )
        assert len(await outbox_rows(db, "order.cancelled", order_id)) == 1
        events = [
            e for e in await outbox_rows(db, "stock.changed", order_id) if e["reason"] == "RELEASE"
        ]
        assert sorted((int(e["reserved_delta"]), int(e["reserved"])) for e in events) == [
            (-3, 0),
            (-1, 0),
            (-1, 0),
        ]
    assert await check_invariants(database_url) == []


async def test_fulfil_ships_confirmed_orders(
    client: httpx.AsyncClient, db: asyncpg.Pool, world: World, database_url: str
) -> None:
    w0, w1, _ = world.warehouses
    product = await new_product(db, stock={w0: 3, w1: 2})
    order = await succeed(client, "placeOrder", order_input(world, (product, 4)))
    order_id = pk(order["id"])
    confirmed = await succeed(client, "confirmOrder", {"orderId": order["id"]})
    assert confirmed["status"] == "CONFIRMED"
    assert await levels(db, product) == {w0: (3, 3), w1: (2, 1)}
    shipped = await succeed(client, "fulfillOrder", {"orderId": order["id"]})
    assert shipped["status"] == "FULFILLED"
    assert {
        s["warehouse"]["id"]: (s["onHand"], s["reserved"])
        for s in shipped["lines"][0]["product"]["stock"]
    } == {
        world.warehouse(0): (0, 0),
        world.warehouse(1): (1, 0),
    }
    assert await levels(db, product) == {w0: (0, 0), w1: (1, 0)}
    moves = await db.fetch(
        "SELECT sl.warehouse_id, m.on_hand_delta, m.reserved_delta FROM stock_movements m"
        " JOIN stock_levels sl ON sl.id = m.stock_level_id"
        " WHERE m.order_id = $1 AND m.reason = 'SHIPMENT'",
        order_id,
    )
    assert sorted(tuple(r) for r in moves) == sorted([(w0, -3, -3), (w1, -1, -1)])
    assert len(await outbox_rows(db, "order.fulfilled", order_id)) == 1
    events = [
        e for e in await outbox_rows(db, "stock.changed", order_id) if e["reason"] == "SHIPMENT"
    ]
    assert sorted(
        (int(e["on_hand_delta"]), int(e["reserved_delta"]), int(e["on_hand"])) for e in events
    ) == [
        (-3, -3, 0),
        (-1, -1, 1),
    ]
    assert await check_invariants(database_url) == []


@dataclass
class States:
    orders: dict[str, str]  # status -> order global id
    quotations: dict[str, str]  # status (EXPIRED_DRAFT for a draft past validUntil) -> id


@pytest_asyncio.fixture(scope="module")
async def states(client: httpx.AsyncClient, db: asyncpg.Pool, world: World) -> States:
    product = await new_product(db, stock={world.warehouses[0]: 100})

    async def order() -> str:
        placed = await succeed(client, "placeOrder", order_input(world, (product, 1)))
        return str(placed["id"])

    orders = {"PENDING": await order(), "CONFIRMED": await order()}
    await succeed(client, "confirmOrder", {"orderId": orders["CONFIRMED"]})
    orders["CANCELLED"] = await order()
    await succeed(client, "cancelOrder", {"orderId": orders["CANCELLED"]})
    orders["FULFILLED"] = await order()
    await succeed(client, "confirmOrder", {"orderId": orders["FULFILLED"]})
    await succeed(client, "fulfillOrder", {"orderId": orders["FULFILLED"]})

    async def quotation(*steps: str) -> str:
        created = await succeed(client, "createQuotation", quote_input(world, (product, 1, None)))
        for step in steps:
            await succeed(client, step, {"quotationId": created["id"]})
        return str(created["id"])

    quotations = {
        "DRAFT": await quotation(),
        "SENT": await quotation("sendQuotation"),
        "ACCEPTED": await quotation("sendQuotation", "acceptQuotation"),
        "REJECTED": await quotation("sendQuotation", "rejectQuotation"),
        "EXPIRED": await quotation("sendQuotation"),
        "EXPIRED_DRAFT": await quotation(),
    }
    await db.execute(
        "UPDATE quotations SET valid_until = now() - interval '1 minute'"
        " WHERE id = ANY($1::bigint[])",
        [pk(quotations["EXPIRED"]), pk(quotations["EXPIRED_DRAFT"])],
    )
    return States(orders, quotations)


ILLEGAL_ORDER_MOVES = [
    ("confirmOrder", "CONFIRMED"),
    ("confirmOrder", "CANCELLED"),
    ("confirmOrder", "FULFILLED"),
    ("cancelOrder", "CANCELLED"),
    ("cancelOrder", "FULFILLED"),
    ("fulfillOrder", "PENDING"),
    ("fulfillOrder", "CANCELLED"),
    ("fulfillOrder", "FULFILLED"),
]


@pytest.mark.parametrize(("mutation", "status"), ILLEGAL_ORDER_MOVES)
async def test_illegal_order_transition_is_invalid_state_and_changes_nothing(
    client: httpx.AsyncClient, db: asyncpg.Pool, states: States, mutation: str, status: str
) -> None:
    order_id = states.orders[status]
    assert await status_of(client, order_id) == status
    before = await snapshot(db)
    payload = await mutate(client, mutation, {"orderId": order_id})
    assert_rejected(payload, mutation, "INVALID_STATE", ["orderId"])
    assert await snapshot(db) == before
    assert await status_of(client, order_id) == status


ILLEGAL_QUOTATION_MOVES = [
    ("updateQuotation", "SENT"),
    ("updateQuotation", "ACCEPTED"),
    ("updateQuotation", "REJECTED"),
    ("updateQuotation", "EXPIRED"),
    ("sendQuotation", "SENT"),
    ("sendQuotation", "ACCEPTED"),
    ("sendQuotation", "REJECTED"),
    ("sendQuotation", "EXPIRED"),
    ("sendQuotation", "EXPIRED_DRAFT"),
    ("rejectQuotation", "DRAFT"),
    ("rejectQuotation", "ACCEPTED"),
    ("rejectQuotation", "REJECTED"),
    ("rejectQuotation", "EXPIRED"),
    ("acceptQuotation", "DRAFT"),
    ("acceptQuotation", "ACCEPTED"),
    ("acceptQuotation", "REJECTED"),
    ("acceptQuotation", "EXPIRED"),
]


@pytest.mark.parametrize(("mutation", "status"), ILLEGAL_QUOTATION_MOVES)
async def test_illegal_quotation_transition_is_invalid_state_and_changes_nothing(
    client: httpx.AsyncClient, db: asyncpg.Pool, states: States, mutation: str, status: str
) -> None:
    quotation_id = states.quotations[status]
    shown = "DRAFT" if status == "EXPIRED_DRAFT" else status
    assert await status_of(client, quotation_id) == shown
    before = await snapshot(db)
    input: Json = {"quotationId": quotation_id}
    if mutation == "updateQuotation":
        input["validUntil"] = future()
    payload = await mutate(client, mutation, input)
    assert_rejected(payload, mutation, "INVALID_STATE", ["quotationId"])
    assert await snapshot(db) == before
    assert await status_of(client, quotation_id) == shown


# ---------------------------------------------------------------- quotations


async def test_quotation_prices_default_to_the_tier_and_round_half_up(
    client: httpx.AsyncClient, db: asyncpg.Pool, world: World, database_url: str
) -> None:
    a = await new_product(db, price="19.99")  # no stock at all: quotations do not check stock
    b = await new_product(db, price="10.30")
    c = await new_product(db, price="7.00")
    d = await new_product(db, price="3.33")
    e = await new_product(db, price="0.99")
    quotation = await succeed(
        client,
        "createQuotation",
        {
            "customerId": world.customer("GOLD"),
            "lines": [
                {"productId": world.product(a), "quantity": 3},  # default: GOLD 5 %
                {"productId": world.product(b), "quantity": 1, "discountPercent": "5"},
                {"productId": world.product(c), "quantity": 2, "discountPercent": "12.5"},
                {"productId": world.product(d), "quantity": 4, "discountPercent": "100"},
                {"productId": world.product(e), "quantity": 10_000, "discountPercent": "0"},
            ],
        },
    )
    assert quotation["status"] == "DRAFT"
    assert re.fullmatch(r"QT-\d+", quotation["number"]), quotation["number"]
    assert quotation["order"] is None
    got = [
        (
            ln["product"]["id"],
            ln["quantity"],
            ln["unitPrice"],
            ln["discountPercent"],
            ln["lineTotal"],
        )
        for ln in quotation["lines"]
    ]
    assert got == [
        (world.product(a), 3, "19.99", "5.00", "56.97"),  # 56.9715
        (world.product(b), 1, "10.30", "5.00", "9.79"),  # 9.785: half-even would give 9.78
        (world.product(c), 2, "7.00", "12.50", "12.25"),
        (world.product(d), 4, "3.33", "100.00", "0.00"),
        (world.product(e), 10_000, "0.99", "0.00", "9900.00"),
    ]
    assert (quotation["subtotal"], quotation["total"], quotation["discountTotal"]) == (
        "9997.59",
        "9979.01",
        "18.58",
    )
    valid_until = datetime.fromisoformat(quotation["validUntil"])
    assert abs(valid_until - (datetime.now(UTC) + timedelta(days=30))) < timedelta(minutes=5)

    standard = await succeed(
        client, "createQuotation", quote_input(world, (a, 1, None), validUntil=future(3))
    )
    assert standard["lines"][0]["discountPercent"] == "0.00"
    assert standard["lines"][0]["lineTotal"] == "19.99"
    valid_until = datetime.fromisoformat(standard["validUntil"])
    assert abs(valid_until - (datetime.now(UTC) + timedelta(days=3))) < timedelta(minutes=5)
    assert await check_invariants(database_url) == []


async def test_update_replaces_and_reprices_lines_of_a_draft(
    client: httpx.AsyncClient, db: asyncpg.Pool, world: World, database_url: str
) -> None:
    a = await new_product(db, price="4.00")
    b = await new_product(db, price="10.30")
    draft = await succeed(
        client,
        "createQuotation",
        {
            "customerId": world.customer("SILVER"),
            "lines": [{"productId": world.product(a), "quantity": 2}],
        },
    )
    assert draft["lines"][0]["lineTotal"] == "7.76"
    await db.execute("UPDATE products SET unit_price = 12.00 WHERE id = $1", b)
    until = future(12)
    updated = await succeed(
        client,
        "updateQuotation",
        {
            "quotationId": draft["id"],
            "lines": [
                {"productId": world.product(b), "quantity": 3},
                {"productId": world.product(a), "quantity": 1, "discountPercent": "50"},
            ],
            "validUntil": until,
        },
    )
    assert updated["status"] == "DRAFT"
    assert [
        (ln["product"]["id"], ln["unitPrice"], ln["discountPercent"], ln["lineTotal"])
        for ln in updated["lines"]
    ] == [
        (world.product(b), "12.00", "3.00", "34.92"),
        (world.product(a), "4.00", "50.00", "2.00"),
    ]
    assert (updated["subtotal"], updated["total"], updated["discountTotal"]) == (
        "40.00",
        "36.92",
        "3.08",
    )
    assert datetime.fromisoformat(updated["validUntil"]) == datetime.fromisoformat(until)
    assert (
        await db.fetchval(
            "SELECT count(*) FROM quotation_lines WHERE quotation_id = $1", pk(draft["id"])
        )
        == 2
    )
    assert await check_invariants(database_url) == []


async def test_send_and_reject(client: httpx.AsyncClient, db: asyncpg.Pool, world: World) -> None:
    product = await new_product(db)
    draft = await succeed(client, "createQuotation", quote_input(world, (product, 1, None)))
    sent = await succeed(client, "sendQuotation", {"quotationId": draft["id"]})
    assert sent["status"] == "SENT"
    rejected = await succeed(client, "rejectQuotation", {"quotationId": draft["id"]})
    assert rejected["status"] == "REJECTED"
    assert rejected["order"] is None
    assert (
        await db.fetchval("SELECT status FROM quotations WHERE id = $1", pk(draft["id"]))
        == "REJECTED"
    )


async def test_accept_creates_an_order_at_the_quoted_prices(
    client: httpx.AsyncClient, db: asyncpg.Pool, world: World, database_url: str
) -> None:
    w0, w1, w2 = world.warehouses
    a = await new_product(db, price="19.99", stock={w0: 5, w1: 3})
    b = await new_product(db, price="10.30", stock={w2: 10})
    quotation = await succeed(
        client,
        "createQuotation",
        {
            "customerId": world.customer("GOLD"),
            "lines": [
                {"productId": world.product(a), "quantity": 6},
                {"productId": world.product(b), "quantity": 1, "discountPercent": "5"},
            ],
        },
    )
    await succeed(client, "sendQuotation", {"quotationId": quotation["id"]})
    # The catalogue price moves on; the order keeps the quoted one and adds no tier discount.
    await db.execute("UPDATE products SET unit_price = 25.00 WHERE id = ANY($1::bigint[])", [a, b])
    key = unique("accept-", 24)
    order = await succeed(
        client, "acceptQuotation", {"quotationId": quotation["id"], "idempotencyKey": key}
    )
    assert order["status"] == "PENDING"
    assert order["quotation"] == {"id": quotation["id"], "number": quotation["number"]}
    assert order["customer"] == {"id": world.customer("GOLD")}
    got = [
        (ln["product"]["id"], ln["quantity"], ln["unitPrice"], ln["discount"], ln["lineTotal"])
        for ln in order["lines"]
    ]
    # a: 6 x 19.99 = 119.94, quoted at 5 % -> 113.943 -> 113.94; b: 10.30 at 5 % -> 9.79
    assert got == [
        (world.product(a), 6, "19.99", "6.00", "113.94"),
        (world.product(b), 1, "10.30", "0.51", "9.79"),
    ]
    assert (order["subtotal"], order["discountTotal"], order["total"]) == (
        quotation["subtotal"],
        quotation["discountTotal"],
        quotation["total"],
    )
    assert {pk(x["warehouse"]["id"]): x["quantity"] for x in order["lines"][0]["allocations"]} == {
        w0: 5,
        w1: 1,
    }
    assert await levels(db, a) == {w0: (5, 5), w1: (3, 1)}
    assert await levels(db, b) == {w2: (10, 1)}

    reread = await gql(client, NODE_STATUS, {"id": quotation["id"]})
    assert reread["data"]["node"] == {"quotationStatus": "ACCEPTED", "order": {"id": order["id"]}}
    assert await db.fetchval(
        "SELECT quotation_id FROM orders WHERE id = $1", pk(order["id"])
    ) == pk(quotation["id"])

    # Same key, same quotation: the same order again.
    again = await succeed(
        client, "acceptQuotation", {"quotationId": quotation["id"], "idempotencyKey": key}
    )
    assert (again["id"], again["number"]) == (order["id"], order["number"])
    # Same key, another quotation: CONFLICT, and that quotation stays SENT.
    other = await succeed(client, "createQuotation", quote_input(world, (b, 1, None)))
    await succeed(client, "sendQuotation", {"quotationId": other["id"]})
    before = await snapshot(db)
    payload = await mutate(
        client, "acceptQuotation", {"quotationId": other["id"], "idempotencyKey": key}
    )
    assert_rejected(payload, "acceptQuotation", "CONFLICT", ["idempotencyKey"])
    # A key that placed an order is taken as well.
    placed_key = unique("placed-", 24)
    await succeed(client, "placeOrder", order_input(world, (b, 1), idempotencyKey=placed_key))
    before = await snapshot(db)
    payload = await mutate(
        client, "acceptQuotation", {"quotationId": other["id"], "idempotencyKey": placed_key}
    )
    assert_rejected(payload, "acceptQuotation", "CONFLICT", ["idempotencyKey"])
    for bad_key in ("", "k" * 201):
        payload = await mutate(
            client, "acceptQuotation", {"quotationId": other["id"], "idempotencyKey": bad_key}
        )
        assert_rejected(payload, "acceptQuotation", INVALID, ["idempotencyKey"])
    assert await snapshot(db) == before
    assert await status_of(client, other["id"]) == "SENT"
    assert await check_invariants(database_url) == []


async def test_accept_without_enough_stock_leaves_the_quotation_sent(
    client: httpx.AsyncClient, db: asyncpg.Pool, world: World
) -> None:
    a = await new_product(db, stock={world.warehouses[0]: 5})
    b = await new_product(db, stock={world.warehouses[1]: 2, world.warehouses[2]: 2})
    quotation = await succeed(
        client, "createQuotation", quote_input(world, (a, 1, None), (b, 5, "10"))
    )
    await succeed(client, "sendQuotation", {"quotationId": quotation["id"]})
    before = await snapshot(db)
    payload = await mutate(client, "acceptQuotation", {"quotationId": quotation["id"]})
    assert_rejected(payload, "acceptQuotation", STOCK, ["lines", "1", "quantity"])
    assert await snapshot(db) == before
    assert await status_of(client, quotation["id"]) == "SENT"


# ---------------------------------------------------------------- adjustStock


async def test_adjust_stock_rules(
    client: httpx.AsyncClient, db: asyncpg.Pool, world: World, database_url: str
) -> None:
    w0, w1, w2 = world.warehouses
    product = await new_product(db, stock={w0: 10})
    await succeed(client, "placeOrder", order_input(world, (product, 4)))

    level = await succeed(
        client, "adjustStock", adjust_input(world, product, 0, 5, reason="RECEIPT")
    )
    assert (level["onHand"], level["reserved"], level["available"]) == (15, 4, 11)
    assert level["warehouse"]["id"] == world.warehouse(0)
    assert level["product"] == {"id": world.product(product)}

    level = await succeed(client, "adjustStock", adjust_input(world, product, 0, -11))
    assert (level["onHand"], level["reserved"], level["available"]) == (4, 4, 0)
    before = await snapshot(db)
    payload = await mutate(client, "adjustStock", adjust_input(world, product, 0, -1))
    assert_rejected(payload, "adjustStock", STOCK, ["delta"])
    assert await snapshot(db) == before

    level = await succeed(
        client, "adjustStock", adjust_input(world, product, 0, 0, lowStockThreshold=3)
    )
    assert (level["onHand"], level["lowStockThreshold"], level["isLow"]) == (4, 3, True)

    created = await succeed(client, "adjustStock", adjust_input(world, product, 2, 7))
    assert (created["onHand"], created["reserved"]) == (7, 0)  # threshold: server default
    assert created["warehouse"]["id"] == world.warehouse(2)

    big = await succeed(
        client, "adjustStock", adjust_input(world, product, 1, 1_000_000, reason="RECEIPT")
    )
    assert big["onHand"] == 1_000_000
    big = await succeed(client, "adjustStock", adjust_input(world, product, 1, -1_000_000))
    assert big["onHand"] == 0

    assert await levels(db, product) == {w0: (4, 4), w1: (0, 0), w2: (7, 0)}
    assert (
        await db.fetchval(
            "SELECT low_stock_threshold FROM stock_levels"
            " WHERE product_id = $1 AND warehouse_id = $2",
            product,
            w0,
        )
        == 3
    )
    moves = await db.fetch(
        "SELECT sl.warehouse_id, m.reason, m.on_hand_delta, m.reserved_delta FROM stock_movements m"
        " JOIN stock_levels sl ON sl.id = m.stock_level_id"
        " WHERE sl.product_id = $1 AND m.order_id IS NULL AND m.on_hand_delta <> 0 ORDER BY m.id",
        product,
    )
    assert [tuple(r) for r in moves] == [
        (w0, "RECEIPT", 10, 0),  # the set-up
        (w0, "RECEIPT", 5, 0),
        (w0, "ADJUSTMENT", -11, 0),
        (w2, "ADJUSTMENT", 7, 0),
        (w1, "RECEIPT", 1_000_000, 0),
        (w1, "ADJUSTMENT", -1_000_000, 0),
    ]
    events = [
        json.loads(r["payload"])
        for r in await db.fetch(
            "SELECT payload FROM outbox WHERE topic = 'stock.changed'"
            " AND payload->>'product_id' = $1 AND payload->>'reason' IN ('RECEIPT', 'ADJUSTMENT')"
            " AND (payload->>'on_hand_delta')::int <> 0 ORDER BY id",
            str(product),
        )
    ]
    assert [
        (
            int(e["warehouse_id"]),
            e["reason"],
            int(e["on_hand_delta"]),
            int(e["on_hand"]),
            int(e["reserved"]),
        )
        for e in events
    ] == [
        (w0, "RECEIPT", 5, 15, 4),
        (w0, "ADJUSTMENT", -11, 4, 4),
        (w2, "ADJUSTMENT", 7, 7, 0),
        (w1, "RECEIPT", 1_000_000, 1_000_000, 0),
        (w1, "ADJUSTMENT", -1_000_000, 0, 0),
    ]
    assert await check_invariants(database_url) == []


# ---------------------------------------------------------------- whole database


async def test_invariants_hold_after_all_writes(database_url: str) -> None:
    assert await check_invariants(database_url) == []

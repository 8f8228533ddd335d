"""Concurrent writes over real HTTP against a real server process (`quartermaster serve`).

The server runs on a database of its own (migrated, rows inserted here by SQL), so these races
never disturb the shared seeded database. Every test creates the products it fights over.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio

from quartermaster.db.migrate import upgrade
from quartermaster.db.seed import check_invariants
from quartermaster.schema.node import decode_any_id, encode_id
from tests.conftest import ADMIN, asyncpg_kwargs
from tests.servers import running_server

Json = dict[str, Any]

ERRORS = "errors { code message field }"
ORDER = """
    id number status
    lines { quantity product { id } allocations { quantity warehouse { id } } }
"""
PLACE = f"""
mutation Place($input: PlaceOrderInput!) {{
  placeOrder(input: $input) {{ order {{ {ORDER} }} {ERRORS} }}
}}"""
MOVE = """
mutation Move($input: {input}!) {{ {name}(input: $input) {{ order {{ id status }} {errors} }} }}
"""
TIERS = ("STANDARD", "SILVER", "GOLD", "PLATINUM")
POOL = 20  # the server's database connections (pool size + overflow, its defaults)


def pk(global_id: str) -> int:
    return decode_any_id(global_id)[1]


@dataclass
class Live:
    database_url: str
    base: str
    warehouses: list[int]  # ascending ids
    customers: list[int]  # one per tier, in TIERS order

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base,
            headers=ADMIN,
            timeout=httpx.Timeout(60.0),
            limits=httpx.Limits(max_connections=250, max_keepalive_connections=250),
        )

    async def connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(**asyncpg_kwargs(self.database_url))

    async def product(self, stock: dict[int, int], price: str = "10.00") -> int:
        """A fresh EUR product with one stock level (and its RECEIPT movement) per entry."""
        conn = await self.connect()
        try:
            async with conn.transaction():
                product_id: int = await conn.fetchval(
                    "INSERT INTO products (sku, name, unit_price, currency)"
                    " VALUES ($1, 'Race product', $2::numeric, 'EUR') RETURNING id",
                    f"RACE-{uuid.uuid4().hex[:16]}",
                    price,
                )
                for warehouse_id, on_hand in stock.items():
                    level_id = await conn.fetchval(
                        "INSERT INTO stock_levels (product_id, warehouse_id, on_hand, reserved,"
                        " low_stock_threshold) VALUES ($1, $2, $3, 0, 0) RETURNING id",
                        product_id,
                        warehouse_id,
                        on_hand,
                    )
                    await conn.execute(
                        "INSERT INTO stock_movements (stock_level_id, reason, on_hand_delta,"
                        " reserved_delta) VALUES ($1, 'RECEIPT', $2, 0)",
                        level_id,
                        on_hand,
                    )
        finally:
            await conn.close()
        return product_id

    async def levels(self, product_id: int) -> dict[int, tuple[int, int]]:
        conn = await self.connect()
        try:
            rows = await conn.fetch(
                "SELECT warehouse_id, on_hand, reserved FROM stock_levels WHERE product_id = $1",
                product_id,
            )
        finally:
            await conn.close()
        return {r["warehouse_id"]: (r["on_hand"], r["reserved"]) for r in rows}

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await self.connect()
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()


async def _set_up(database_url: str) -> tuple[list[int], list[int]]:
    conn = await asyncpg.connect(**asyncpg_kwargs(database_url))
    try:
        warehouses = [
            await conn.fetchval(
                "INSERT INTO warehouses (code, name) VALUES ($1, $2) RETURNING id",
                f"RACE{i}",
                f"Race warehouse {i}",
            )
            for i in range(3)
        ]
        customers = [
            await conn.fetchval(
                "INSERT INTO customers (name, email, tier) VALUES ($1, $2, $3) RETURNING id",
                f"Racer {tier.title()}",
                f"racer-{tier.lower()}@example.test",
                tier,
            )
            for tier in TIERS
        ]
    finally:
        await conn.close()
    return warehouses, customers


@pytest.fixture(scope="module")
def live(scratch_database: Callable[[str], str], redis_url: str) -> Iterator[Live]:
    url = scratch_database("writes")
    upgrade(url)
    warehouses, customers = asyncio.run(_set_up(url))
    env = {
        "QM_DATABASE_URL": url,
        "QM_REDIS_URL": redis_url,
        "QM_DB_POOL_SIZE": str(POOL // 2),
        "QM_DB_MAX_OVERFLOW": str(POOL - POOL // 2),
    }
    with running_server(env) as base:
        yield Live(url, base, sorted(warehouses), customers)


@pytest_asyncio.fixture
async def http(live: Live) -> AsyncIterator[httpx.AsyncClient]:
    async with live.http() as client:
        yield client


async def post(http: httpx.AsyncClient, query: str, variables: Json) -> httpx.Response:
    return await http.post("/graphql", json={"query": query, "variables": variables})


def payloads(responses: list[httpx.Response], name: str) -> list[Json]:
    """The mutation payloads; fails unless every answer is a 200 without GraphQL errors."""
    bad = [r for r in responses if r.status_code != 200 or "errors" in r.json()]
    assert not bad, f"{len(bad)} bad answers, e.g. {bad[0].status_code} {bad[0].text[:500]}"
    return [r.json()["data"][name] for r in responses]


def place_input(live: Live, lines: list[tuple[int, int]], customer: int = 0, **extra: Any) -> Json:
    return {
        "input": {
            "customerId": encode_id("Customer", live.customers[customer]),
            "lines": [{"productId": encode_id("Product", p), "quantity": q} for p, q in lines],
            **extra,
        }
    }


def problems(payload: Json) -> list[tuple[str, list[str] | None]]:
    return [(e["code"], e["field"]) for e in payload["errors"]]


async def test_200_concurrent_orders_sell_exactly_the_100_available_units(
    live: Live, http: httpx.AsyncClient
) -> None:
    product = await live.product({live.warehouses[0]: 100})
    variables = place_input(live, [(product, 1)])
    responses = await asyncio.gather(*(post(http, PLACE, variables) for _ in range(200)))
    answers = payloads(responses, "placeOrder")

    placed = [a for a in answers if a["order"] is not None]
    refused = [a for a in answers if a["order"] is None]
    assert len(placed) == 100
    assert all(a["errors"] == [] for a in placed)
    assert len({a["order"]["id"] for a in placed}) == 100
    assert len({a["order"]["number"] for a in placed}) == 100
    assert len(refused) == 100
    assert all(problems(a) == [("INSUFFICIENT_STOCK", ["lines", "0", "quantity"])] for a in refused)

    assert await live.levels(product) == {live.warehouses[0]: (100, 100)}
    (count,) = await live.fetch(
        "SELECT count(DISTINCT order_id) FROM order_lines WHERE product_id = $1", product
    )
    assert count[0] == 100
    assert await check_invariants(live.database_url) == []


def simulate(available: dict[int, int], quantity: int) -> dict[int, int]:
    """The spec's strategy: fullest warehouse first (ties: lower id), take all it has."""
    taken: dict[int, int] = {}
    for warehouse in sorted(available, key=lambda w: (-available[w], w)):
        if quantity == 0 or available[warehouse] <= 0:
            break
        take = min(quantity, available[warehouse])
        taken[warehouse] = take
        available[warehouse] -= take
        quantity -= take
    assert quantity == 0, "simulated an order that should not have fitted"
    return taken


async def test_crossing_orders_over_two_products_and_warehouses_never_deadlock(
    live: Live, http: httpx.AsyncClient
) -> None:
    w0, w1, _ = live.warehouses
    stock = {"p": {w0: 60, w1: 45}, "q": {w0: 40, w1: 75}}
    p = await live.product(stock["p"])
    q = await live.product(stock["q"])
    requests = []
    for i in range(50):
        lines = [(p, 1 + i % 4), (q, 1 + (i * 3) % 5)]
        requests.append(lines if i % 2 == 0 else lines[::-1])
    responses = await asyncio.gather(
        *(
            post(http, PLACE, place_input(live, lines, customer=i % len(TIERS)))
            for i, lines in enumerate(requests)
        )
    )
    answers = payloads(responses, "placeOrder")

    order_of: dict[int, list[tuple[int, int]]] = {}  # order pk -> requested lines
    failed: list[list[tuple[int, int]]] = []
    for lines, answer in zip(requests, answers, strict=True):
        if answer["order"] is None:
            assert answer["errors"], answer
            assert {code for code, _ in problems(answer)} == {"INSUFFICIENT_STOCK"}
            assert all(
                field in (["lines", "0", "quantity"], ["lines", "1", "quantity"])
                for _, field in problems(answer)
            )
            failed.append(lines)
            continue
        assert answer["errors"] == []
        order = answer["order"]
        for (product, quantity), line in zip(lines, order["lines"], strict=True):
            assert pk(line["product"]["id"]) == product
            assert line["quantity"] == quantity
            assert sum(a["quantity"] for a in line["allocations"]) == quantity
        order_of[pk(order["id"])] = lines
    assert order_of, "no order got through"
    assert failed, "demand was meant to exceed supply"

    # Every order locked both products' levels before allocating, so the transactions ran one
    # after the other, in the order of their ledger rows: replay them through the strategy.
    allocated: dict[int, dict[int, dict[int, int]]] = defaultdict(lambda: defaultdict(dict))
    sequence: list[int] = []
    for row in await live.fetch(
        "SELECT m.order_id, sl.product_id, sl.warehouse_id, m.reserved_delta"
        " FROM stock_movements m JOIN stock_levels sl ON sl.id = m.stock_level_id"
        " WHERE sl.product_id = ANY($1::bigint[]) AND m.reason = 'RESERVATION' ORDER BY m.id",
        [p, q],
    ):
        if row["order_id"] not in allocated:
            sequence.append(row["order_id"])
        allocated[row["order_id"]][row["product_id"]][row["warehouse_id"]] = row["reserved_delta"]
    assert sorted(sequence) == sorted(order_of)
    available = {product: dict(stock[name]) for product, name in ((p, "p"), (q, "q"))}
    for order_id in sequence:
        for product, quantity in order_of[order_id]:
            expected = simulate(available[product], quantity)
            assert allocated[order_id][product] == expected, (order_id, product, quantity)
    # Stock only ever went down, so an order refused then must be refused by what is left now.
    for lines in failed:
        assert any(quantity > sum(available[product].values()) for product, quantity in lines)

    for product, name in ((p, "p"), (q, "q")):
        reserved = {w: stock[name][w] - left for w, left in available[product].items()}
        assert await live.levels(product) == {w: (stock[name][w], reserved[w]) for w in stock[name]}
    assert await check_invariants(live.database_url) == []


async def test_one_idempotency_key_sent_ten_times_at_once_makes_one_order(
    live: Live, http: httpx.AsyncClient
) -> None:
    p = await live.product({live.warehouses[0]: 50})
    q = await live.product({live.warehouses[1]: 50})
    key = f"race-{uuid.uuid4()}"
    variables = place_input(live, [(p, 2), (q, 1)], idempotencyKey=key)
    responses = await asyncio.gather(*(post(http, PLACE, variables) for _ in range(10)))
    answers = payloads(responses, "placeOrder")
    assert answers[0]["errors"] == [] and answers[0]["order"] is not None
    assert all(a == answers[0] for a in answers)
    rows = await live.fetch("SELECT id FROM orders WHERE idempotency_key = $1", key)
    assert [r["id"] for r in rows] == [pk(answers[0]["order"]["id"])]
    assert await live.levels(p) == {live.warehouses[0]: (50, 2)}

    # the lines in another order are the same input
    (again,) = payloads(
        [await post(http, PLACE, place_input(live, [(q, 1), (p, 2)], idempotencyKey=key))],
        "placeOrder",
    )
    assert again == answers[0]
    # other lines, concurrently: all CONFLICT, nothing written
    other = place_input(live, [(p, 3), (q, 1)], idempotencyKey=key)
    conflicts = payloads(
        await asyncio.gather(*(post(http, PLACE, other) for _ in range(5))), "placeOrder"
    )
    for answer in conflicts:
        assert answer["order"] is None
        assert problems(answer) == [("CONFLICT", ["idempotencyKey"])]
    assert len(await live.fetch("SELECT id FROM orders WHERE idempotency_key = $1", key)) == 1
    assert await live.levels(p) == {live.warehouses[0]: (50, 2)}
    assert await check_invariants(live.database_url) == []


def move(name: str, order_id: str) -> tuple[str, Json]:
    input_type = {"cancelOrder": "CancelOrderInput"}.get(name, "OrderIdInput")
    query = MOVE.format(input=input_type, name=name, errors=ERRORS)
    return query, {"input": {"orderId": order_id}}


async def race(http: httpx.AsyncClient, order_id: str, names: list[str]) -> list[tuple[str, Json]]:
    """Send the mutations at once; (name, payload) in sending order."""
    requests = [move(name, order_id) for name in names]
    responses = await asyncio.gather(*(post(http, q, v) for q, v in requests))
    return [
        (name, payload)
        for name, response in zip(names, responses, strict=True)
        for payload in payloads([response], name)
    ]


async def order_status(live: Live, order_id: str) -> str:
    (row,) = await live.fetch("SELECT status FROM orders WHERE id = $1", pk(order_id))
    status: str = row["status"]
    return status


TARGET = {"cancelOrder": "CANCELLED", "fulfillOrder": "FULFILLED", "confirmOrder": "CONFIRMED"}
RACES = {
    "cancel+fulfil on CONFIRMED": (True, ["cancelOrder", "fulfillOrder"] * 5),
    "confirm x10 on PENDING": (False, ["confirmOrder"] * 10),
    "cancel x10 on PENDING": (False, ["cancelOrder"] * 10),
    "cancel+confirm on PENDING": (False, ["cancelOrder", "confirmOrder"] * 5),
}


async def run_races(
    live: Live, http: httpx.AsyncClient, product: int, rounds: int
) -> list[tuple[str, str, list[tuple[str, Json]]]]:
    """``rounds`` orders per kind of race, all raced at once: (kind, order id, outcome)."""

    async def new_order(confirmed: bool) -> str:
        (answer,) = payloads(
            [await post(http, PLACE, place_input(live, [(product, 3)]))], "placeOrder"
        )
        assert answer["errors"] == [], answer
        order_id: str = answer["order"]["id"]
        if confirmed:
            query, variables = move("confirmOrder", order_id)
            (confirm,) = payloads([await post(http, query, variables)], "confirmOrder")
            assert confirm["errors"] == []
        return order_id

    plan = [
        (kind, confirmed, names)
        for kind, (confirmed, names) in RACES.items()
        for _ in range(rounds)
    ]
    order_ids = await asyncio.gather(*(new_order(confirmed) for _, confirmed, _ in plan))
    contenders = [
        (kind, order_id, names) for (kind, _, names), order_id in zip(plan, order_ids, strict=True)
    ]
    outcomes = await asyncio.gather(
        *(race(http, order_id, names) for _, order_id, names in contenders)
    )
    return [
        (kind, order_id, outcome)
        for (kind, order_id, _), outcome in zip(contenders, outcomes, strict=True)
    ]


async def test_racing_transitions_change_the_state_once(
    live: Live, http: httpx.AsyncClient
) -> None:
    w0, w1, _ = live.warehouses
    product = await live.product({w0: 30, w1: 30})
    shipped = open_reserved = 0
    for kind, order_id, outcome in await run_races(live, http, product, rounds=3):
        for name, payload in outcome:
            if payload["errors"]:
                assert payload["order"] is None
                assert problems(payload) == [("INVALID_STATE", ["orderId"])], (kind, name)
        wins = sorted(name for name, payload in outcome if payload["errors"] == [])
        final = await order_status(live, order_id)
        if kind == "cancel+confirm on PENDING":
            # cancel first wins alone; confirm first may be followed by one cancel
            assert wins in (["cancelOrder"], ["confirmOrder"], ["cancelOrder", "confirmOrder"])
            assert final == ("CANCELLED" if "cancelOrder" in wins else "CONFIRMED")
        else:
            assert len(wins) == 1, (kind, wins)
            assert final == TARGET[wins[0]]
        shipped += 3 if final == "FULFILLED" else 0
        open_reserved += 3 if final in ("PENDING", "CONFIRMED") else 0
        moves = await live.fetch(
            "SELECT reason, count(*) AS n FROM stock_movements WHERE order_id = $1 GROUP BY 1",
            pk(order_id),
        )
        counts = {r["reason"]: r["n"] for r in moves}
        undone = counts.get("RELEASE", 0) + counts.get("SHIPMENT", 0)
        assert undone == (counts["RESERVATION"] if final in ("CANCELLED", "FULFILLED") else 0)

    levels = await live.levels(product)
    assert sum(on_hand for on_hand, _ in levels.values()) == 60 - shipped
    assert sum(reserved for _, reserved in levels.values()) == open_reserved
    assert await check_invariants(live.database_url) == []


async def wait_for_lock_waiters(live: Live, count: int) -> None:
    conn = await live.connect()
    try:
        for _ in range(1000):
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if waiting >= count:
                return
            await asyncio.sleep(0.01)
    finally:
        await conn.close()
    raise AssertionError(f"{waiting} requests waiting on a lock, expected {count}")


async def test_a_winning_transition_answers_with_the_state_it_made(
    live: Live, http: httpx.AsyncClient
) -> None:
    """confirmOrder with a cancelOrder queued right behind it: both succeed, and the confirm's
    payload must show CONFIRMED (the state it made), not the CANCELLED that came after it.

    The test holds the orders' row locks while the requests queue up (confirms first), fills the
    server's connection pool (POOL connections) and queues reads behind it, then lets go: a
    payload read after the commit, on a connection of its own, waits behind those reads while the
    cancel, already holding its connection, commits.
    """
    product = await live.product({live.warehouses[0]: 100})
    order_ids = []
    for _ in range(POOL // 2):
        (answer,) = payloads(
            [await post(http, PLACE, place_input(live, [(product, 1)]))], "placeOrder"
        )
        order_ids.append(answer["order"]["id"])
    blocker = await live.connect()
    try:
        async with blocker.transaction():
            await blocker.execute(
                "SELECT 1 FROM orders WHERE id = ANY($1::bigint[]) FOR UPDATE",
                [pk(order_id) for order_id in order_ids],
            )
            confirms = [
                asyncio.create_task(post(http, *move("confirmOrder", order_id)))
                for order_id in order_ids
            ]
            await wait_for_lock_waiters(live, len(order_ids))
            cancels = [
                asyncio.create_task(post(http, *move("cancelOrder", order_id)))
                for order_id in order_ids
            ]
            await wait_for_lock_waiters(live, POOL)
            reads = [
                asyncio.create_task(post(http, "{ products(first: 1) { totalCount } }", {}))
                for _ in range(3 * POOL)
            ]
            await asyncio.sleep(0.3)
    finally:
        await blocker.close()
    confirmed = payloads(list(await asyncio.gather(*confirms)), "confirmOrder")
    cancelled = payloads(list(await asyncio.gather(*cancels)), "cancelOrder")
    assert all(r.status_code == 200 for r in await asyncio.gather(*reads))
    assert all(p["errors"] == [] for p in confirmed + cancelled), confirmed + cancelled
    assert [p["order"]["status"] for p in cancelled] == ["CANCELLED"] * len(order_ids)
    assert [p["order"]["status"] for p in confirmed] == ["CONFIRMED"] * len(order_ids)


QUOTATION_MOVE = """
mutation Q($input: {input}!) {{ {name}(input: $input) {{ {thing} {{ id status }} {errors} }} }}
"""


async def call(
    http: httpx.AsyncClient, name: str, input_type: str, thing: str, input: Json
) -> Json:
    query = QUOTATION_MOVE.format(input=input_type, name=name, thing=thing, errors=ERRORS)
    (payload,) = payloads([await post(http, query, {"input": input})], name)
    return payload


async def sent_quotation(live: Live, http: httpx.AsyncClient, product: int, quantity: int) -> str:
    created = await call(
        http,
        "createQuotation",
        "CreateQuotationInput",
        "quotation",
        {
            "customerId": encode_id("Customer", live.customers[2]),
            "lines": [{"productId": encode_id("Product", product), "quantity": quantity}],
        },
    )
    quotation_id: str = created["quotation"]["id"]
    sent = await call(
        http, "sendQuotation", "QuotationIdInput", "quotation", {"quotationId": quotation_id}
    )
    assert sent["quotation"]["status"] == "SENT"
    return quotation_id


async def test_racing_accepts_convert_a_quotation_once(live: Live, http: httpx.AsyncClient) -> None:
    product = await live.product({live.warehouses[0]: 40})
    accept = QUOTATION_MOVE.format(
        input="AcceptQuotationInput", name="acceptQuotation", thing="order", errors=ERRORS
    )
    reject = QUOTATION_MOVE.format(
        input="QuotationIdInput", name="rejectQuotation", thing="quotation", errors=ERRORS
    )
    plain, keyed, contested = [await sent_quotation(live, http, product, 2) for _ in range(3)]
    key = f"accept-{uuid.uuid4()}"
    responses = await asyncio.gather(
        *(post(http, accept, {"input": {"quotationId": plain}}) for _ in range(8)),
        *(
            post(http, accept, {"input": {"quotationId": keyed, "idempotencyKey": key}})
            for _ in range(8)
        ),
        *(post(http, accept, {"input": {"quotationId": contested}}) for _ in range(4)),
        *(post(http, reject, {"input": {"quotationId": contested}}) for _ in range(4)),
    )
    answers = payloads(responses[:16], "acceptQuotation")
    contest = payloads(responses[16:20], "acceptQuotation") + payloads(
        responses[20:], "rejectQuotation"
    )

    plain_wins = [a for a in answers[:8] if a["errors"] == []]
    assert len(plain_wins) == 1, answers[:8]
    for answer in answers[:8]:
        if answer["errors"]:
            assert answer["order"] is None
            assert problems(answer) == [("INVALID_STATE", ["quotationId"])]
    assert all(a == answers[8] for a in answers[8:16]), answers[8:16]
    assert answers[8]["errors"] == [] and answers[8]["order"]["status"] == "PENDING"

    wins = [a for a in contest if a["errors"] == []]
    assert len(wins) == 1, contest
    assert all(problems(a) == [("INVALID_STATE", ["quotationId"])] for a in contest if a["errors"])

    rows = await live.fetch(
        "SELECT q.id, q.status, count(o.id) AS orders FROM quotations q"
        " LEFT JOIN orders o ON o.quotation_id = q.id WHERE q.id = ANY($1::bigint[]) GROUP BY 1, 2",
        [pk(plain), pk(keyed), pk(contested)],
    )
    state = {r["id"]: (r["status"], r["orders"]) for r in rows}
    assert state[pk(plain)] == ("ACCEPTED", 1)
    assert state[pk(keyed)] == ("ACCEPTED", 1)
    assert state[pk(contested)] in (("ACCEPTED", 1), ("REJECTED", 0))
    orders = 2 + state[pk(contested)][1]
    assert await live.levels(product) == {live.warehouses[0]: (40, 2 * orders)}
    assert await check_invariants(live.database_url) == []


async def test_adjustments_racing_orders_never_oversell(
    live: Live, http: httpx.AsyncClient
) -> None:
    w0, w1, w2 = live.warehouses
    product = await live.product({w0: 50})
    adjust = """
    mutation A($input: AdjustStockInput!) {
      adjustStock(input: $input) { stockLevel { onHand reserved } errors { code field } }
    }"""

    def adjustment(warehouse: int, delta: int) -> Json:
        return {
            "input": {
                "productId": encode_id("Product", product),
                "warehouseId": encode_id("Warehouse", warehouse),
                "delta": delta,
            }
        }

    responses = await asyncio.gather(
        *(post(http, PLACE, place_input(live, [(product, 2)])) for _ in range(25)),
        *(post(http, adjust, adjustment(w0, -2)) for _ in range(25)),
        *(post(http, adjust, adjustment(w1, 1)) for _ in range(10)),  # creates the level once
    )
    placed = payloads(responses[:25], "placeOrder")
    taken = payloads(responses[25:50], "adjustStock")
    added = payloads(responses[50:], "adjustStock")
    orders = sum(a["errors"] == [] for a in placed)
    removals = sum(a["errors"] == [] for a in taken)
    assert all(a["errors"] == [] for a in added), added
    for answer in placed:
        if answer["errors"]:
            assert problems(answer) == [("INSUFFICIENT_STOCK", ["lines", "0", "quantity"])]
    for answer in taken:
        if answer["errors"]:
            assert problems(answer) == [("INSUFFICIENT_STOCK", ["delta"])]
    levels = await live.levels(product)
    assert levels[w1][0] == 10
    # Units were reserved from w1 too once it held stock: all orders' units add up.
    assert sum(reserved for _, reserved in levels.values()) == 2 * orders
    assert levels[w0][0] == 50 - 2 * removals
    assert w2 not in levels
    assert all(0 <= reserved <= on_hand for on_hand, reserved in levels.values())
    assert await check_invariants(live.database_url) == []


async def test_a_deadlock_is_retried_inside_the_server(live: Live, http: httpx.AsyncClient) -> None:
    """The test's own transaction deadlocks with a placeOrder; the order still gets through.

    The test locks the product's second level; placeOrder locks the first and waits for the
    second; then the test asks for the first. The server's backend waited first, so after
    deadlock_timeout (1 s) it is the one PostgreSQL aborts with 40P01: the server must retry.
    """
    w0, w1, _ = live.warehouses
    product = await live.product({w0: 5, w1: 5})
    (first, second) = sorted(
        (r["warehouse_id"], r["id"])
        for r in await live.fetch(
            "SELECT id, warehouse_id FROM stock_levels WHERE product_id = $1", product
        )
    )
    deadlocks_before = await deadlocks(live)
    blocker = await live.connect()
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM stock_levels WHERE id = $1 FOR UPDATE", second[1])
            request = asyncio.create_task(post(http, PLACE, place_input(live, [(product, 7)])))
            await wait_for_lock_waiters(live, 1)
            await blocker.execute("SELECT 1 FROM stock_levels WHERE id = $1 FOR UPDATE", first[1])
    finally:
        await blocker.close()
    (answer,) = payloads([await request], "placeOrder")
    assert answer["errors"] == [], answer
    allocated = {
        pk(a["warehouse"]["id"]): a["quantity"] for a in answer["order"]["lines"][0]["allocations"]
    }
    assert allocated == {w0: 5, w1: 2}
    assert await live.levels(product) == {w0: (5, 5), w1: (5, 2)}
    assert await check_invariants(live.database_url) == []
    for _ in range(50):  # statistics reach pg_stat_database within a second or so
        if await deadlocks(live) > deadlocks_before:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("no deadlock happened: the test did not exercise the retry")


async def deadlocks(live: Live) -> int:
    (row,) = await live.fetch(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    )
    return int(row["deadlocks"])

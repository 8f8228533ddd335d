"""A Hypothesis state machine driving the write path of a real server.

Rules place, confirm, cancel and fulfil orders, adjust stock, create+send, accept and reject
quotations, in random order on a handful of products, warehouses and customers (inserted by SQL
into a database of the module's own). Every answer is predicted from the database as it was just
before the call (stock available, the model's statuses); after every step the seed's SQL
invariants must hold and the model's statuses must match the rows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from quartermaster.db.migrate import upgrade
from quartermaster.db.seed import check_invariants
from quartermaster.schema.node import decode_any_id, encode_id
from tests.conftest import ADMIN, asyncpg_kwargs
from tests.servers import running_server

Json = dict[str, Any]
T = TypeVar("T")

TIERS = {"STANDARD": 0, "SILVER": 3, "GOLD": 5, "PLATINUM": 8}
PRICES = ("19.99", "0.35", "10.50", "7.00")
WAREHOUSES = 3
#: initial on_hand per (product index, warehouse index); missing pairs have no stock level
STOCK = {
    (0, 0): 30,
    (0, 1): 12,
    (1, 0): 40,
    (1, 2): 9,
    (2, 1): 25,
    (3, 0): 6,
    (3, 1): 6,
    (3, 2): 14,
}

ERRORS = "errors { code message field }"
ORDER = """
    id status subtotal discountTotal total quotation { id }
    lines { quantity unitPrice discount lineTotal product { id }
            allocations { quantity warehouse { id } } }
"""
QUOTATION = "id status lines { quantity unitPrice discountPercent lineTotal product { id } }"
DOCUMENTS = {
    "placeOrder": ("PlaceOrderInput", "order", ORDER),
    "confirmOrder": ("OrderIdInput", "order", "id status"),
    "cancelOrder": ("CancelOrderInput", "order", "id status"),
    "fulfillOrder": ("OrderIdInput", "order", "id status"),
    "adjustStock": ("AdjustStockInput", "stockLevel", "onHand reserved"),
    "createQuotation": ("CreateQuotationInput", "quotation", QUOTATION),
    "sendQuotation": ("QuotationIdInput", "quotation", QUOTATION),
    "rejectQuotation": ("QuotationIdInput", "quotation", "id status"),
    "acceptQuotation": ("AcceptQuotationInput", "order", ORDER),
}


def money(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.01"), ROUND_HALF_UP)


def pk(global_id: str) -> int:
    return decode_any_id(global_id)[1]


class Sql:
    """A private event loop and connection, so synchronous rules can run SQL."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.run(asyncpg.connect(**asyncpg_kwargs(database_url)))

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return list(self.run(self.conn.fetch(query, *args)))

    def close(self) -> None:
        self.run(self.conn.close())
        self.loop.close()


@dataclass
class Stage:
    base: str
    sql: Sql
    products: list[int]
    warehouses: list[int]
    customers: dict[str, int]


async def _set_up(database_url: str) -> tuple[list[int], list[int], dict[str, int]]:
    conn = await asyncpg.connect(**asyncpg_kwargs(database_url))
    try:
        warehouses = [
            await conn.fetchval(
                "INSERT INTO warehouses (code, name) VALUES ($1, $1) RETURNING id", f"SM{i}"
            )
            for i in range(WAREHOUSES)
        ]
        products = [
            await conn.fetchval(
                "INSERT INTO products (sku, name, unit_price, currency)"
                " VALUES ($1, $1, $2::numeric, 'EUR') RETURNING id",
                f"SM-{i}",
                price,
            )
            for i, price in enumerate(PRICES)
        ]
        customers = {
            tier: await conn.fetchval(
                "INSERT INTO customers (name, email, tier) VALUES ($1, $2, $1) RETURNING id",
                tier,
                f"machine-{tier.lower()}@example.test",
            )
            for tier in TIERS
        }
    finally:
        await conn.close()
    return products, warehouses, customers


#: Back to the initial stock with no orders, quotations, ledger or events: every example starts
#: from the same state, so Hypothesis can replay and shrink it.
RESET = """
TRUNCATE orders, order_lines, stock_allocations, stock_movements, quotations, quotation_lines,
         outbox, integration_jobs, stock_levels RESTART IDENTITY;
INSERT INTO stock_levels (product_id, warehouse_id, on_hand, reserved, low_stock_threshold)
SELECT p.id, w.id, s.on_hand, 0, 0
FROM (VALUES {values}) s(p, w, on_hand)
JOIN (SELECT id, row_number() OVER (ORDER BY id) - 1 AS i FROM products) p ON p.i = s.p
JOIN (SELECT id, row_number() OVER (ORDER BY id) - 1 AS i FROM warehouses) w ON w.i = s.w;
INSERT INTO stock_movements (stock_level_id, reason, on_hand_delta, reserved_delta)
SELECT id, 'RECEIPT', on_hand, 0 FROM stock_levels;
""".format(values=", ".join(f"({p}, {w}, {n})" for (p, w), n in STOCK.items()))


@pytest.fixture(scope="module")
def stage(scratch_database: Callable[[str], str], redis_url: str) -> Iterator[Stage]:
    url = scratch_database("machine")
    upgrade(url)
    products, warehouses, customers = asyncio.run(_set_up(url))
    sql = Sql(url)
    try:
        with running_server({"QM_DATABASE_URL": url, "QM_REDIS_URL": redis_url}) as base:
            yield Stage(base, sql, products, warehouses, customers)
    finally:
        sql.close()


def simulate(available: dict[int, int], quantity: int) -> dict[int, int]:
    """The spec's allocation: fullest warehouse first (ties: lower id), take all it has."""
    taken: dict[int, int] = {}
    for warehouse in sorted(available, key=lambda w: (-available[w], w)):
        if quantity == 0 or available[warehouse] <= 0:
            break
        taken[warehouse] = min(quantity, available[warehouse])
        quantity -= taken[warehouse]
    return taken


product_index = st.integers(0, len(PRICES) - 1)
order_lines = st.lists(
    st.tuples(product_index, st.integers(1, 9)), min_size=1, max_size=3, unique_by=lambda t: t[0]
)
discounts = st.one_of(st.none(), st.sampled_from(["0", "2.5", "5", "12.34", "100"]))
quotation_lines = st.lists(
    st.tuples(product_index, st.integers(1, 9), discounts),
    min_size=1,
    max_size=3,
    unique_by=lambda t: t[0],
)
tiers = st.sampled_from(sorted(TIERS))


class WriteMachine(RuleBasedStateMachine):
    orders = Bundle("orders")
    confirmed = Bundle("confirmed")  # orders that were confirmed at some point
    quotations = Bundle("quotations")

    def __init__(self, stage: Stage, http: httpx.Client) -> None:
        super().__init__()
        self.stage = stage
        self.http = http
        self.order_status: dict[str, str] = {}
        self.quotation_status: dict[str, str] = {}
        self.quoted: dict[str, Json] = {}
        stage.sql.run(stage.sql.conn.execute(RESET))

    # -- plumbing

    def call(self, name: str, input: Json) -> Json:
        input_type, thing, fields = DOCUMENTS[name]
        query = (
            f"mutation M($input: {input_type}!) {{"
            f" {name}(input: $input) {{ {thing} {{ {fields} }} {ERRORS} }} }}"
        )
        response = self.http.post("/graphql", json={"query": query, "variables": {"input": input}})
        assert response.status_code == 200, response.text
        body = response.json()
        assert "errors" not in body, body["errors"]
        payload: Json = body["data"][name]
        if payload["errors"]:
            assert payload[thing] is None, payload
        else:
            assert payload[thing] is not None, payload
        return payload

    def available(self) -> dict[int, dict[int, int]]:
        """product pk -> warehouse pk -> available, as of now."""
        out: dict[int, dict[int, int]] = {p: {} for p in self.stage.products}
        for row in self.stage.sql.fetch(
            "SELECT product_id, warehouse_id, on_hand - reserved AS available FROM stock_levels"
            " WHERE product_id = ANY($1::bigint[])",
            self.stage.products,
        ):
            out[row["product_id"]][row["warehouse_id"]] = row["available"]
        return out

    def check_reservation(
        self, order: Json, lines: list[tuple[int, int]], before: dict[int, dict[int, int]]
    ) -> None:
        for (product, quantity), line in zip(lines, order["lines"], strict=True):
            assert pk(line["product"]["id"]) == product
            assert line["quantity"] == quantity
            got = {pk(a["warehouse"]["id"]): a["quantity"] for a in line["allocations"]}
            assert got == simulate(before[product], quantity), (got, before[product], quantity)

    @staticmethod
    def expect_short(payload: Json, short: list[int]) -> None:
        assert short
        reported = [(e["code"], e["field"]) for e in payload["errors"]]
        assert reported, payload
        for code, field in reported:
            assert code == "INSUFFICIENT_STOCK", reported
            assert field in [["lines", str(i), "quantity"] for i in short], reported

    def expect_state_error(self, payload: Json, field: str) -> None:
        assert [(e["code"], e["field"]) for e in payload["errors"]] == [("INVALID_STATE", [field])]

    # -- orders

    @rule(target=orders, tier=tiers, picks=order_lines)
    def place(self, tier: str, picks: list[tuple[int, int]]) -> Any:
        order_id = self.place_order(tier, picks)
        return multiple() if order_id is None else order_id

    @rule(targets=(orders, confirmed), tier=tiers, picks=order_lines)
    def place_and_confirm(self, tier: str, picks: list[tuple[int, int]]) -> Any:
        order_id = self.place_order(tier, picks)
        if order_id is None:
            return multiple()
        assert self.transition("confirmOrder", order_id, ("PENDING",), "CONFIRMED")
        return order_id

    def place_order(self, tier: str, picks: list[tuple[int, int]]) -> str | None:
        lines = [(self.stage.products[i], q) for i, q in picks]
        before = self.available()
        payload = self.call(
            "placeOrder",
            {
                "customerId": encode_id("Customer", self.stage.customers[tier]),
                "lines": [{"productId": encode_id("Product", p), "quantity": q} for p, q in lines],
            },
        )
        short = [i for i, (p, q) in enumerate(lines) if q > sum(before[p].values())]
        event("place: " + ("short" if short else "placed"))
        if short:
            self.expect_short(payload, short)
            return None
        assert payload["errors"] == [], (payload["errors"], before)
        order = payload["order"]
        assert order["status"] == "PENDING"
        self.check_reservation(order, lines, before)
        for (i, quantity), line in zip(picks, order["lines"], strict=True):
            price = Decimal(PRICES[i])
            discount = money(quantity * price * TIERS[tier] / 100)
            assert (line["unitPrice"], line["discount"]) == (PRICES[i], str(discount))
        self.order_status[order["id"]] = "PENDING"
        return str(order["id"])

    def transition(self, name: str, order_id: str, allowed: tuple[str, ...], after: str) -> bool:
        payload = self.call(name, {"orderId": order_id})
        legal = self.order_status[order_id] in allowed
        event(f"{name}: " + ("ok" if legal else "refused"))
        if legal:
            assert payload["errors"] == [], payload["errors"]
            assert payload["order"]["status"] == after
            self.order_status[order_id] = after
        else:
            self.expect_state_error(payload, "orderId")
        return legal

    @rule(target=confirmed, order=orders)
    def confirm(self, order: str) -> Any:
        legal = self.transition("confirmOrder", order, ("PENDING",), "CONFIRMED")
        return order if legal else multiple()

    @rule(order=orders)
    def cancel(self, order: str) -> None:
        self.transition("cancelOrder", order, ("PENDING", "CONFIRMED"), "CANCELLED")

    @rule(order=orders)
    def fulfil(self, order: str) -> None:
        self.transition("fulfillOrder", order, ("CONFIRMED",), "FULFILLED")

    @rule(order=confirmed)
    def cancel_confirmed(self, order: str) -> None:
        self.transition("cancelOrder", order, ("PENDING", "CONFIRMED"), "CANCELLED")

    @rule(order=confirmed)
    def fulfil_confirmed(self, order: str) -> None:
        self.transition("fulfillOrder", order, ("CONFIRMED",), "FULFILLED")

    # -- stock

    @rule(
        product=product_index,
        warehouse=st.integers(0, WAREHOUSES - 1),
        delta=st.sampled_from([-20, -5, -2, -1, 0, 1, 4, 10, 25]),
    )
    def adjust(self, product: int, warehouse: int, delta: int) -> None:
        product_id, warehouse_id = self.stage.products[product], self.stage.warehouses[warehouse]
        rows = self.stage.sql.fetch(
            "SELECT on_hand, reserved FROM stock_levels"
            " WHERE product_id = $1 AND warehouse_id = $2",
            product_id,
            warehouse_id,
        )
        on_hand, reserved = (rows[0]["on_hand"], rows[0]["reserved"]) if rows else (0, 0)
        payload = self.call(
            "adjustStock",
            {
                "productId": encode_id("Product", product_id),
                "warehouseId": encode_id("Warehouse", warehouse_id),
                "delta": delta,
                "reason": "RECEIPT" if delta > 0 else "ADJUSTMENT",
            },
        )
        problems = [(e["code"], e["field"]) for e in payload["errors"]]
        event("adjust: " + (problems[0][0] if problems else "ok"))
        if delta == 0:
            assert problems == [("INVALID_INPUT", ["delta"])]
        elif on_hand + delta < reserved:
            assert problems == [("INSUFFICIENT_STOCK", ["delta"])]
        elif not rows and delta < 0:
            assert problems in ([("INSUFFICIENT_STOCK", ["delta"])], [("INVALID_INPUT", ["delta"])])
        else:
            assert problems == []
            level = payload["stockLevel"]
            assert (level["onHand"], level["reserved"]) == (on_hand + delta, reserved)

    # -- quotations

    @rule(target=quotations, tier=tiers, picks=quotation_lines)
    def quote_and_send(self, tier: str, picks: list[tuple[int, int, str | None]]) -> str:
        lines = []
        for i, quantity, discount in picks:
            line: Json = {
                "productId": encode_id("Product", self.stage.products[i]),
                "quantity": quantity,
            }
            if discount is not None:
                line["discountPercent"] = discount
            lines.append(line)
        created = self.call(
            "createQuotation",
            {"customerId": encode_id("Customer", self.stage.customers[tier]), "lines": lines},
        )
        assert created["errors"] == [], created["errors"]
        quotation = created["quotation"]
        for (i, quantity, discount), line in zip(picks, quotation["lines"], strict=True):
            percent = Decimal(discount) if discount is not None else Decimal(TIERS[tier])
            assert Decimal(line["discountPercent"]) == percent
            expected = money(quantity * Decimal(PRICES[i]) * (100 - percent) / 100)
            assert line["lineTotal"] == str(expected)
        sent = self.call("sendQuotation", {"quotationId": quotation["id"]})
        assert sent["errors"] == [] and sent["quotation"]["status"] == "SENT"
        self.quotation_status[quotation["id"]] = "SENT"
        self.quoted[quotation["id"]] = quotation
        return str(quotation["id"])

    @rule(target=orders, quotation=quotations)
    def accept(self, quotation: str) -> Any:
        before = self.available()
        payload = self.call("acceptQuotation", {"quotationId": quotation})
        if self.quotation_status[quotation] != "SENT":
            event("accept: refused")
            self.expect_state_error(payload, "quotationId")
            return multiple()
        quoted = self.quoted[quotation]["lines"]
        lines = [(pk(line["product"]["id"]), line["quantity"]) for line in quoted]
        short = [i for i, (p, q) in enumerate(lines) if q > sum(before[p].values())]
        event("accept: " + ("short" if short else "accepted"))
        if short:
            self.expect_short(payload, short)
            return multiple()
        assert payload["errors"] == [], (payload["errors"], before)
        order = payload["order"]
        assert order["status"] == "PENDING"
        assert order["quotation"] == {"id": quotation}
        self.check_reservation(order, lines, before)
        for q_line, o_line in zip(quoted, order["lines"], strict=True):
            assert o_line["unitPrice"] == q_line["unitPrice"]
            assert o_line["lineTotal"] == q_line["lineTotal"]
        self.quotation_status[quotation] = "ACCEPTED"
        self.order_status[order["id"]] = "PENDING"
        return order["id"]

    @rule(quotation=quotations)
    def reject(self, quotation: str) -> None:
        payload = self.call("rejectQuotation", {"quotationId": quotation})
        if self.quotation_status[quotation] == "SENT":
            assert payload["errors"] == [] and payload["quotation"]["status"] == "REJECTED"
            self.quotation_status[quotation] = "REJECTED"
        else:
            self.expect_state_error(payload, "quotationId")

    # -- after every step

    @invariant()
    def database_is_consistent(self) -> None:
        sql = self.stage.sql
        assert sql.run(check_invariants(sql.database_url)) == []
        if self.order_status:
            rows = sql.fetch(
                "SELECT id, status FROM orders WHERE id = ANY($1::bigint[])",
                [pk(i) for i in self.order_status],
            )
            assert {encode_id("Order", r["id"]): r["status"] for r in rows} == self.order_status
        if self.quotation_status:
            rows = sql.fetch(
                "SELECT id, status FROM quotations WHERE id = ANY($1::bigint[])",
                [pk(i) for i in self.quotation_status],
            )
            expected = {encode_id("Quotation", r["id"]): r["status"] for r in rows}
            assert expected == self.quotation_status


def test_random_write_sequences_keep_the_books_straight(stage: Stage) -> None:
    with httpx.Client(base_url=stage.base, headers=ADMIN, timeout=30.0) as http:
        run_state_machine_as_test(
            lambda: WriteMachine(stage, http),
            settings=settings(
                max_examples=15,
                stateful_step_count=15,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
                database=None,
            ),
        )

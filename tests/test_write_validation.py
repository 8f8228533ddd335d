"""Every rejected mutation input: its code and field path, and nothing written."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from quartermaster.schema.node import encode_id
from tests.write_support import (
    INVALID,
    MISSING,
    NOT_FOUND,
    STOCK,
    Builder,
    World,
    adjust,
    adjust_input,
    all_bulk,
    assert_rejected,
    by_id,
    mutate,
    past,
    place,
    problems,
    quote,
    raw,
    snapshot,
    update,
)

Json = dict[str, Any]


@dataclass(frozen=True)
class Case:
    mutation: str
    id: str
    code: str
    path: str  # the expected `field`, dotted
    input: Builder

    @property
    def field(self) -> list[str]:
        return self.path.split(".")


PO, CQ, UQ, AS = "placeOrder", "createQuotation", "updateQuotation", "adjustStock"
ORDER_MOVES = ("confirmOrder", "cancelOrder", "fulfillOrder")
QUOTATION_MOVES = ("updateQuotation", "sendQuotation", "rejectQuotation", "acceptQuotation")
NO_CUSTOMER = raw(encode_id("Customer", MISSING))
NO_PRODUCT = raw(encode_id("Product", MISSING))
A_PRODUCT, A_CUSTOMER = raw(encode_id("Product", 1)), raw(encode_id("Customer", 1))
A_WAREHOUSE, A_QUOTATION = raw(encode_id("Warehouse", 1)), encode_id("Quotation", 1)

# fmt: off
CASES = [
    Case(PO, "no-lines", INVALID, "lines", place()),
    Case(PO, "101-lines", INVALID, "lines", all_bulk),
    Case(PO, "quantity-0", INVALID, "lines.1.quantity", place(("eur", 1), ("eur2", 0))),
    Case(PO, "quantity-negative", INVALID, "lines.0.quantity", place(("eur", -3))),
    Case(PO, "quantity-10001", INVALID, "lines.1.quantity", place(("eur2", 1), ("eur", 10_001))),
    Case(PO, "duplicate-product", INVALID, "lines.2.productId",
         place(("eur", 1), ("eur2", 1), ("eur", 2))),
    Case(PO, "malformed-customer", INVALID, "customerId", place(("eur", 1), customer="=nope")),
    Case(PO, "customer-id-of-a-product", INVALID, "customerId",
         place(("eur", 1), customer=A_PRODUCT)),
    Case(PO, "malformed-product", INVALID, "lines.1.productId", place(("eur", 1), ("=%%%", 1))),
    Case(PO, "product-id-of-a-customer", INVALID, "lines.0.productId", place((A_CUSTOMER, 1))),
    Case(PO, "unknown-customer", NOT_FOUND, "customerId", place(("eur", 1), customer=NO_CUSTOMER)),
    Case(PO, "unknown-product", NOT_FOUND, "lines.1.productId", place(("eur", 1), (NO_PRODUCT, 1))),
    Case(PO, "inactive-product", INVALID, "lines.1.productId", place(("eur", 1), ("inactive", 1))),
    Case(PO, "mixed-currency", INVALID, "lines.1.productId", place(("eur", 1), ("usd", 1))),
    Case(PO, "mixed-currency-first-differing", INVALID, "lines.1.productId",
         place(("usd", 1), ("eur", 1), ("eur2", 1))),
    Case(PO, "insufficient-stock-all-or-nothing", STOCK, "lines.1.quantity",
         place(("eur", 2), ("scarce", 4))),
    Case(PO, "insufficient-stock", STOCK, "lines.0.quantity", place(("eur", 51))),
    Case(PO, "empty-idempotency-key", INVALID, "idempotencyKey",
         place(("eur", 1), idempotencyKey="")),
    Case(PO, "idempotency-key-201-chars", INVALID, "idempotencyKey",
         place(("eur", 1), idempotencyKey="k" * 201)),

    Case(CQ, "no-lines", INVALID, "lines", quote()),
    Case(CQ, "101-lines", INVALID, "lines", all_bulk),
    Case(CQ, "quantity-0", INVALID, "lines.1.quantity", quote(("eur", 1), ("eur2", 0))),
    Case(CQ, "quantity-10001", INVALID, "lines.0.quantity", quote(("eur", 10_001))),
    Case(CQ, "duplicate-product", INVALID, "lines.1.productId", quote(("eur", 1), ("eur", 2))),
    Case(CQ, "malformed-customer", INVALID, "customerId", quote(("eur", 1), customer="=!")),
    Case(CQ, "unknown-customer", NOT_FOUND, "customerId", quote(("eur", 1), customer=NO_CUSTOMER)),
    Case(CQ, "product-id-of-a-warehouse", INVALID, "lines.1.productId",
         quote(("eur", 1), (A_WAREHOUSE, 1))),
    Case(CQ, "unknown-product", NOT_FOUND, "lines.0.productId", quote((NO_PRODUCT, 1))),
    Case(CQ, "inactive-product", INVALID, "lines.0.productId", quote(("inactive", 1))),
    Case(CQ, "mixed-currency", INVALID, "lines.2.productId",
         quote(("eur", 1), ("eur2", 1), ("usd", 1))),
    Case(CQ, "discount-negative", INVALID, "lines.0.discountPercent", quote(("eur", 1, "-0.01"))),
    Case(CQ, "discount-over-100", INVALID, "lines.1.discountPercent",
         quote(("eur", 1, "5"), ("eur2", 1, "100.01"))),
    Case(CQ, "discount-three-decimals", INVALID, "lines.0.discountPercent",
         quote(("eur", 1, "12.345"))),
    Case(CQ, "valid-until-in-the-past", INVALID, "validUntil",
         lambda w: quote(("eur", 1), validUntil=past())(w)),
    Case(UQ, "valid-until-in-the-past", INVALID, "validUntil",
         lambda w: update(validUntil=past())(w)),
    Case(UQ, "quantity-0", INVALID, "lines.0.quantity", update(("eur", 0))),
    Case(UQ, "duplicate-product", INVALID, "lines.1.productId", update(("eur", 1), ("eur", 1))),
    Case(UQ, "discount-over-100", INVALID, "lines.0.discountPercent", update(("eur", 1, "101"))),
    Case(UQ, "mixed-currency", INVALID, "lines.1.productId", update(("eur", 1), ("usd", 1))),
    *(Case(m, "unknown-quotation", NOT_FOUND, "quotationId",
           by_id("quotationId", encode_id("Quotation", MISSING))) for m in QUOTATION_MOVES),
    Case("acceptQuotation", "id-of-an-order", INVALID, "quotationId",
         by_id("quotationId", encode_id("Order", 1))),

    *(Case(m, "unknown-order", NOT_FOUND, "orderId", by_id("orderId", encode_id("Order", MISSING)))
      for m in ORDER_MOVES),
    *(Case(m, "malformed-order-id", INVALID, "orderId", by_id("orderId", "Order:1"))
      for m in ORDER_MOVES),
    *(Case(m, "id-of-a-quotation", INVALID, "orderId", by_id("orderId", A_QUOTATION))
      for m in ORDER_MOVES),

    *(Case(AS, f"reason-{r.lower()}", INVALID, "reason", adjust("eur", 0, 1, reason=r))
      for r in ("RESERVATION", "RELEASE", "SHIPMENT")),
    Case(AS, "receipt-negative", INVALID, "delta", adjust("eur", 0, -1, reason="RECEIPT")),
    Case(AS, "receipt-zero-with-threshold", INVALID, "delta",
         adjust("eur", 0, 0, reason="RECEIPT", lowStockThreshold=4)),
    Case(AS, "delta-over-a-million", INVALID, "delta", adjust("eur", 0, 1_000_001)),
    Case(AS, "delta-under-minus-a-million", INVALID, "delta", adjust("eur", 0, -1_000_001)),
    Case(AS, "delta-zero-without-threshold", INVALID, "delta", adjust("eur", 0, 0)),
    Case(AS, "negative-threshold", INVALID, "lowStockThreshold",
         adjust("eur", 0, 1, lowStockThreshold=-1)),
    Case(AS, "below-reserved", STOCK, "delta", adjust("scarce", 1, -4)),
    Case(AS, "unknown-product", NOT_FOUND, "productId", adjust(NO_PRODUCT, 0, 1)),
    Case(AS, "unknown-warehouse", NOT_FOUND, "warehouseId",
         adjust("eur", raw(encode_id("Warehouse", MISSING)), 1)),
    Case(AS, "malformed-product", INVALID, "productId", adjust("=x", 0, 1)),
    Case(AS, "warehouse-id-of-a-product", INVALID, "warehouseId", adjust("eur", A_PRODUCT, 1)),
]
# fmt: on


@pytest.mark.parametrize("case", CASES, ids=[f"{c.mutation}-{c.id}" for c in CASES])
async def test_rejected_input_has_code_and_field_and_writes_nothing(
    client: httpx.AsyncClient, db: asyncpg.Pool, world: World, case: Case
) -> None:
    before = await snapshot(db)
    payload = await mutate(client, case.mutation, case.input(world))
    assert_rejected(payload, case.mutation, case.code, case.field)
    assert await snapshot(db) == before


async def test_negative_delta_on_a_missing_level_is_refused_and_creates_nothing(
    client: httpx.AsyncClient, db: asyncpg.Pool, world: World
) -> None:
    before = await snapshot(db)
    payload = await mutate(client, "adjustStock", adjust_input(world, world.eur, 2, -1))
    assert payload["stockLevel"] is None
    assert problems(payload) in ([(STOCK, ["delta"])], [(INVALID, ["delta"])])
    assert await snapshot(db) == before

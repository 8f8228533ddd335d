"""Every rejected mutation input: its code and field path, and nothing written."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from quartermaster.schema.node import encode_id
from tests.conftest import gql
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
    resolve,
    snapshot,
    unique,
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


# ---------------------------------------------------------------- createProduct, updateProduct

PRODUCT_FIELDS = "id sku name unitPrice currency"
CREATE_PRODUCT = (
    "mutation Create($input: CreateProductInput!) { createProduct(input: $input) {"
    f" product {{ {PRODUCT_FIELDS} }} errors {{ code message field }} }} }}"
)
UPDATE_PRODUCT = (
    "mutation Update($input: UpdateProductInput!) { updateProduct(input: $input) {"
    f" product {{ {PRODUCT_FIELDS} }} errors {{ code message field }} }} }}"
)
PRODUCT_DOCS = {"createProduct": CREATE_PRODUCT, "updateProduct": UPDATE_PRODUCT}
CP, UP = "createProduct", "updateProduct"


async def sku_of(db: asyncpg.Pool, product_id: int) -> str:
    sku: str = await db.fetchval("SELECT sku FROM products WHERE id = $1", product_id)
    return sku


def new_product_input(**overrides: Any) -> Json:
    return {"sku": unique("VT-"), "name": "Validation product", "unitPrice": "12.50", **overrides}


def edit(product: int | str = "eur", **changes: Any) -> Builder:
    """An updateProduct input for a World product (or a raw "=<id>")."""
    return lambda w: {"productId": w.product(resolve(w, product)), **changes}


async def product_rows(db: asyncpg.Pool) -> str:
    """A digest of every product row, so that an UPDATE shows too (counts and max ids do not)."""
    digest: str = await db.fetchval(
        "SELECT md5(string_agg(p::text, ',' ORDER BY id)) FROM products AS p"
    )
    return digest


def create(**overrides: Any) -> Builder:
    return lambda w: new_product_input(**overrides)


CONFLICT = "CONFLICT"
NO_SUCH_PRODUCT = raw(encode_id("Product", MISSING))

# fmt: off
PRODUCT_CASES = [
    Case(CP, "price-negative", INVALID, "unitPrice", create(unitPrice="-0.01")),
    Case(CP, "price-over-max", INVALID, "unitPrice", create(unitPrice="1000000000000.00")),
    Case(CP, "price-huge-exponent", INVALID, "unitPrice", create(unitPrice="1E+40")),
    Case(CP, "price-three-decimals", INVALID, "unitPrice", create(unitPrice="12.345")),
    Case(CP, "price-tiny-exponent", INVALID, "unitPrice", create(unitPrice="1E-7")),
    Case(CP, "sku-empty", INVALID, "sku", create(sku="")),
    Case(CP, "sku-65-chars", INVALID, "sku", create(sku="S" * 65)),
    Case(CP, "sku-with-space", INVALID, "sku", create(sku="AB 12")),
    Case(CP, "sku-leading-dash", INVALID, "sku", create(sku="-AB12")),
    Case(CP, "sku-trailing-newline", INVALID, "sku", create(sku="AB12\n")),
    Case(CP, "name-empty", INVALID, "name", create(name="")),
    Case(CP, "name-blank", INVALID, "name", create(name="   ")),
    Case(CP, "name-201-chars", INVALID, "name", create(name="n" * 201)),
    Case(CP, "category-101-chars", INVALID, "category", create(category="c" * 101)),
    Case(CP, "currency-lowercase", INVALID, "currency", create(currency="eur")),
    Case(CP, "currency-4-letters", INVALID, "currency", create(currency="EURO")),
    Case(CP, "currency-trailing-newline", INVALID, "currency", create(currency="EUR\n")),

    Case(UP, "unknown-product", NOT_FOUND, "productId", edit(NO_SUCH_PRODUCT, name="X")),
    Case(UP, "id-of-a-customer", INVALID, "productId", edit(A_CUSTOMER, name="X")),
    Case(UP, "malformed-id", INVALID, "productId", edit("=Product:1", name="X")),
    Case(UP, "price-negative", INVALID, "unitPrice", edit(unitPrice="-1")),
    Case(UP, "price-over-max", INVALID, "unitPrice", edit(unitPrice="1000000000000")),
    Case(UP, "price-three-decimals", INVALID, "unitPrice", edit(unitPrice="0.001")),
    Case(UP, "name-empty", INVALID, "name", edit(name="")),
    Case(UP, "name-201-chars", INVALID, "name", edit(name="n" * 201)),
    Case(UP, "category-101-chars", INVALID, "category", edit(category="c" * 101)),
]
# fmt: on


async def product_mutate(client: httpx.AsyncClient, name: str, input: Json) -> Json:
    body = await gql(client, PRODUCT_DOCS[name], {"input": input})
    payload: Json = body["data"][name]
    return payload


@pytest.mark.parametrize("case", PRODUCT_CASES, ids=[f"{c.mutation}-{c.id}" for c in PRODUCT_CASES])
async def test_rejected_product_input_has_code_and_field_and_writes_nothing(
    client: httpx.AsyncClient, db: asyncpg.Pool, world: World, case: Case
) -> None:
    before = (await snapshot(db), await product_rows(db))
    payload = await product_mutate(client, case.mutation, case.input(world))
    assert payload["product"] is None, payload
    assert problems(payload) == [(case.code, case.field)], payload["errors"]
    assert (await snapshot(db), await product_rows(db)) == before


async def test_create_with_a_taken_sku_is_conflict_and_writes_nothing(
    client: httpx.AsyncClient, db: asyncpg.Pool, world: World
) -> None:
    taken = await sku_of(db, world.eur)
    before = (await snapshot(db), await product_rows(db))
    payload = await product_mutate(client, CP, new_product_input(sku=taken, unitPrice="1.00"))
    assert payload["product"] is None, payload
    assert problems(payload) == [(CONFLICT, ["sku"])], payload["errors"]
    assert (await snapshot(db), await product_rows(db)) == before


async def test_create_reports_every_bad_field_at_once(
    client: httpx.AsyncClient, db: asyncpg.Pool, world: World
) -> None:
    before = (await snapshot(db), await product_rows(db))
    bad = new_product_input(sku="", name=" ", unitPrice="-5", currency="x")
    payload = await product_mutate(client, CP, bad)
    assert payload["product"] is None
    assert sorted(problems(payload)) == sorted(
        [(INVALID, ["sku"]), (INVALID, ["name"]), (INVALID, ["unitPrice"]), (INVALID, ["currency"])]
    )
    assert (await snapshot(db), await product_rows(db)) == before


async def test_price_limits_are_inclusive(
    client: httpx.AsyncClient, db: asyncpg.Pool, world: World
) -> None:
    """The largest price, zero and trailing zeros ("1.500") pass: the checks above are not
    stricter than the rule, and the column holds what the rule allows."""
    for price, stored in (("999999999999.99", "999999999999.99"), ("0", "0.00"), ("1.500", "1.50")):
        product = await gql(client, CREATE_PRODUCT, {"input": new_product_input(unitPrice=price)})
        payload = product["data"][CP]
        assert payload["errors"] == [], payload
        assert payload["product"]["unitPrice"] == stored
        assert (
            await db.fetchval(
                "SELECT unit_price::text FROM products WHERE sku = $1", payload["product"]["sku"]
            )
            == stored
        )


MALFORMED_DECIMALS = ["12,50", "abc", "NaN", "Infinity", "", 12.5, True]


@pytest.mark.parametrize("mutation", [CP, UP])
@pytest.mark.parametrize("price", MALFORMED_DECIMALS, ids=[repr(p) for p in MALFORMED_DECIMALS])
async def test_malformed_price_is_a_graphql_error_and_writes_nothing(
    client: httpx.AsyncClient, db: asyncpg.Pool, world: World, mutation: str, price: object
) -> None:
    input = (
        new_product_input(unitPrice=price)
        if mutation == CP
        else {"productId": world.product(world.eur), "unitPrice": price}
    )
    before = (await snapshot(db), await product_rows(db))
    response = await client.post(
        "/graphql", json={"query": PRODUCT_DOCS[mutation], "variables": {"input": input}}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body.get("data") is None, body
    [error] = body["errors"]
    assert error["extensions"]["code"] == "BAD_USER_INPUT", error
    assert "unitPrice" in error["message"], error
    assert (await snapshot(db), await product_rows(db)) == before


async def test_update_cannot_change_the_sku(
    client: httpx.AsyncClient, db: asyncpg.Pool, world: World
) -> None:
    """UpdateProductInput has no `sku`: an SKU is fixed at creation, so an update to a taken
    SKU (or any SKU) is refused by the schema and changes nothing."""
    taken = await sku_of(db, world.eur2)
    before = (await snapshot(db), await product_rows(db))
    body = await gql(
        client,
        UPDATE_PRODUCT,
        {"input": {"productId": world.product(world.eur), "sku": taken}},
        errors=True,
    )
    assert body.get("data") is None, body
    [error] = body["errors"]
    assert error["extensions"]["code"] == "BAD_USER_INPUT", error
    assert "sku" in error["message"], error
    assert (await snapshot(db), await product_rows(db)) == before
    assert await sku_of(db, world.eur) != taken

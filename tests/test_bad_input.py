"""Bad input of every kind: a GraphQL error with a stable ``extensions.code`` and a helpful
message, HTTP 200 (or a 4xx with a JSON error body for a malformed HTTP request), never a 500
and never a stack trace.

Masking of unexpected resolver exceptions is covered in ``test_http.py``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import gql

Json = dict[str, Any]


def gid(type_name: str, pk: int | str) -> str:
    return base64.urlsafe_b64encode(f"{type_name}:{pk}".encode()).decode().rstrip("=")


def forged_cursor(*values: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(values)).encode()).decode().rstrip("=")


def assert_clean(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text
    assert 'File "' not in response.text
    assert "Internal server error" not in response.text, response.text


def error_of(response: httpx.Response) -> Json:
    """The one error of a response, after the checks every bad request must pass."""
    assert_clean(response)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body.get("errors"), body
    error: Json = body["errors"][0]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error.get("extensions", {}).get("code"), str), error
    return error


async def graphql_error(
    client: httpx.AsyncClient, query: str, variables: Json | None = None
) -> Json:
    response = await client.post("/graphql", json={"query": query, "variables": variables or {}})
    assert response.status_code == 200, response.text
    return error_of(response)


def expect(error: Json, code: str, *mentions: str) -> None:
    assert error["extensions"]["code"] == code, error
    for word in mentions:
        assert word.lower() in error["message"].lower(), (word, error["message"])


# -- arguments of connections and ids: (query, variables, code, words the message must contain)

CONN = "{ edges { cursor } }"
AFTER = f"products(first: 3, after: $c) {CONN}"
AFTER_BY_PRICE = f"products(first: 3, after: $c, orderBy: {{field: PRICE}}) {CONN}"
AFTER_BY_DATE = f"products(first: 3, after: $c, orderBy: {{field: CREATED_AT}}) {CONN}"
CURSOR_CASES = [  # (case, connection field taking `$c`, cursor)
    ("not-base64", AFTER, "not a cursor!"),
    ("empty", AFTER, ""),
    ("json-object", AFTER, base64.urlsafe_b64encode(b'{"a": 1}').decode()),
    ("not-json", AFTER, base64.urlsafe_b64encode(b"\xff\xfe garbage").decode()),
    ("wrong-length", AFTER, forged_cursor("products:NAME:asc", "x")),
    ("wrong-type", AFTER, forged_cursor("products:NAME:asc", 5, 1)),
    ("id-not-int", AFTER, forged_cursor("products:NAME:asc", "x", "1")),
    ("id-bool", AFTER, forged_cursor("products:NAME:asc", "x", True)),
    ("before", f"products(last: 3, before: $c) {CONN}", "%%%"),
    ("first-0", f"products(first: 0, after: $c) {CONN}", "junk"),
    ("price-nan", AFTER_BY_PRICE, forged_cursor("products:PRICE:asc", "NaN", 1)),
    ("no-offset", AFTER_BY_DATE, forged_cursor("products:CREATED_AT:asc", "2025-01-01T00:00", 1)),
    # Well-formed values the database cannot take: refused as cursors, not failing in SQL.
    ("id-out-of-range", AFTER, forged_cursor("products:NAME:asc", "x", 2**63)),
    ("nul-in-text", AFTER, forged_cursor("products:NAME:asc", "nul\u0000byte", 1)),
    ("price-out-of-range", AFTER_BY_PRICE, forged_cursor("products:PRICE:asc", "1e999999", 1)),
    (
        "timestamp-out-of-range",
        AFTER_BY_DATE,
        forged_cursor("products:CREATED_AT:asc", "0001-01-01T00:00:00+14:00", 1),
    ),
]


@pytest.mark.parametrize(
    ("field", "cursor"), [c[1:] for c in CURSOR_CASES], ids=[c[0] for c in CURSOR_CASES]
)
async def test_bad_cursors(client: httpx.AsyncClient, field: str, cursor: str) -> None:
    error = await graphql_error(client, f"query($c: String) {{ {field} }}", {"c": cursor})
    expect(error, "INVALID_CURSOR", "before" if "before: $c" in field else "after", "cursor")


async def cursor_of(client: httpx.AsyncClient, query: str) -> str:
    body = await gql(client, query)
    edges = body["data"]
    while "edges" not in edges:
        edges = next(iter(edges.values()))
    cursor: str = edges["edges"][0]["cursor"]
    return cursor


async def test_cursor_of_another_connection_or_ordering(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    customer = gid("Customer", await db.fetchval("SELECT customer_id FROM orders LIMIT 1"))

    def customer_orders(args: str) -> str:
        return f'node(id: "{customer}") {{ ... on Customer {{ orders({args}) {CONN} }} }}'

    cursors = {
        "products": await cursor_of(client, f"{{ products(first: 1) {CONN} }}"),
        "products-by-price": await cursor_of(
            client, f"{{ products(first: 1, orderBy: {{field: PRICE}}) {CONN} }}"
        ),
        "products-by-price-desc": await cursor_of(
            client, f"{{ products(first: 1, orderBy: {{field: PRICE, direction: DESC}}) {CONN} }}"
        ),
        "orders": await cursor_of(client, f"{{ orders(first: 1) {CONN} }}"),
        "customer.orders": await cursor_of(client, f"{{ {customer_orders('first: 1')} }}"),
    }
    misuses = [
        ("products", f"orders(first: 2, after: $c) {CONN}"),
        ("products", f"customers(first: 2, after: $c) {CONN}"),
        ("products", f"products(first: 2, after: $c, orderBy: {{field: PRICE}}) {CONN}"),
        ("products-by-price", f"products(last: 2, before: $c) {CONN}"),
        (
            "products-by-price-desc",
            f"products(first: 2, after: $c, orderBy: {{field: PRICE}}) {CONN}",
        ),
        ("orders", f"orders(first: 2, after: $c, orderBy: {{field: TOTAL}}) {CONN}"),
        ("orders", customer_orders("first: 2, after: $c")),
        ("customer.orders", f"orders(first: 2, after: $c) {CONN}"),
    ]
    for source, field in misuses:
        query = f"query($c: String) {{ {field} }}"
        error = await graphql_error(client, query, {"c": cursors[source]})
        expect(error, "INVALID_CURSOR", "another connection or ordering")


PAGINATION_CASES = [
    ("products(first: 101)", "PAGE_SIZE_EXCEEDED", ("first", "100", "101")),
    ("orders(last: 101)", "PAGE_SIZE_EXCEEDED", ("last", "100")),
    ("products(first: 1000000)", "PAGE_SIZE_EXCEEDED", ("first", "100")),
    ("customers(first: 1) { edges { node { orders(first: 101)", "PAGE_SIZE_EXCEEDED", ("first",)),
    ("products(first: -1)", "INVALID_PAGINATION", ("first", "negative")),
    ("quotations(last: -5)", "INVALID_PAGINATION", ("last", "negative")),
    (
        "warehouses(first: 1) { edges { node { stockLevels(last: -1)",
        "INVALID_PAGINATION",
        ("last",),
    ),
    ("warehouses(first: 1, last: 1)", "INVALID_PAGINATION", ("first", "last")),
    ("stockLevels(first: 0, last: 0)", "INVALID_PAGINATION", ("first", "last")),
]


@pytest.mark.parametrize(("field", "code", "mentions"), PAGINATION_CASES)
async def test_bad_page_sizes(
    client: httpx.AsyncClient, field: str, code: str, mentions: tuple[str, ...]
) -> None:
    closing = " } } }" * field.count("{ edges")
    error = await graphql_error(client, f"{{ {field} {{ totalCount }}{closing} }}")
    expect(error, code, *mentions)
    if code == "PAGE_SIZE_EXCEEDED":
        assert error["extensions"]["maxPageSize"] == 100


NODE, NODES = ("node(id: $v) { id }", "ID!"), ("nodes(ids: $v) { id }", "[ID!]!")
ORDERS_BY = ("orders(filter: {customerId: $v}) { totalCount }", "ID")
QUOTES_BY = ("quotations(filter: {customerId: $v}) { totalCount }", "ID")
NESTED_BY = (
    "customers(first: 1) { edges { node { orders(filter: {customerId: $v}) { totalCount } } } }",
    "ID",
)
LEVELS_OF = ("stockLevels(filter: {productIds: $v}) { totalCount }", "[ID!]")
LEVELS_IN = ("stockLevels(filter: {warehouseIds: $v}) { totalCount }", "[ID!]")
ID_CASES = [  # (case, (field taking $v, type of $v), value, code, words of the message)
    ("node-not-base64", NODE, "!!!", "INVALID_ID", ("id",)),
    ("node-empty", NODE, "", "INVALID_ID", ("id",)),
    ("node-pk-not-int", NODE, gid("Customer", "abc"), "INVALID_ID", ("id",)),
    ("node-pk-zero", NODE, gid("Customer", 0), "INVALID_ID", ("id",)),
    ("node-pk-negative", NODE, gid("Customer", -3), "INVALID_ID", ("id",)),
    ("node-pk-leading-zeros", NODE, gid("Customer", "007"), "INVALID_ID", ("id",)),
    ("node-pk-too-big", NODE, gid("Customer", 2**64), "INVALID_ID", ("id",)),
    ("nodes-one-bad", NODES, [gid("Product", 1), "garbage"], "INVALID_ID", ("id",)),
    ("nodes-101", NODES, [gid("Product", i) for i in range(1, 102)], "TOO_MANY_IDS",
     ("ids", "100", "101")),
    ("orders-customer-malformed", ORDERS_BY, "garbage", "INVALID_ID", ("customerId",)),
    ("orders-customer-is-product", ORDERS_BY, gid("Product", 1), "INVALID_ID",
     ("customerId", "Customer", "Product")),
    ("quotations-customer-is-order", QUOTES_BY, gid("Order", 1), "INVALID_ID",
     ("customerId", "Customer")),
    ("nested-customer-is-warehouse", NESTED_BY, gid("Warehouse", 1), "INVALID_ID",
     ("customerId", "Customer")),
    ("stock-product-is-warehouse", LEVELS_OF, [gid("Product", 1), gid("Warehouse", 1)],
     "INVALID_ID", ("productIds", "Product")),
    ("stock-warehouse-malformed", LEVELS_IN, ["x"], "INVALID_ID", ("warehouseIds",)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "code", "mentions"), [c[1:] for c in ID_CASES], ids=[c[0] for c in ID_CASES]
)
async def test_bad_ids(
    client: httpx.AsyncClient,
    field: tuple[str, str],
    value: Any,
    code: str,
    mentions: tuple[str, ...],
) -> None:
    selection, var_type = field
    error = await graphql_error(client, f"query($v: {var_type}) {{ {selection} }}", {"v": value})
    expect(error, code, *mentions)


# -- documents and variables the GraphQL layer refuses before any resolver runs

PRODUCTS_F = "query($f: ProductFilter) { products(filter: $f) { totalCount } }"
ORDERS_F = "query($f: OrderFilter) { orders(filter: $f) { totalCount } }"
DOCUMENT_CASES = [  # (case, document, variables, code, words of the message)
    ("syntax", "{ products { ", {}, "GRAPHQL_PARSE_FAILED", ("syntax",)),
    ("unknown-field", "{ products(first: 1) { edges { node { nope } } } }", {},
     "GRAPHQL_VALIDATION_FAILED", ("nope",)),
    ("unknown-argument", "{ products(size: 3) { totalCount } }", {}, "GRAPHQL_VALIDATION_FAILED",
     ("size",)),
    ("missing-argument", "{ node { id } }", {}, "GRAPHQL_VALIDATION_FAILED", ("id",)),
    ("int-overflow", "{ products(first: 2147483648) { totalCount } }", {},
     "GRAPHQL_VALIDATION_FAILED", ("int",)),
    ("decimal-literal", '{ products(filter: {minPrice: "abc"}) { totalCount } }', {},
     "BAD_USER_INPUT", ("abc",)),
    ("decimal", PRODUCTS_F, {"f": {"minPrice": "abc"}}, "BAD_USER_INPUT", ("minPrice", "abc")),
    ("decimal-nan", PRODUCTS_F, {"f": {"maxPrice": "NaN"}}, "BAD_USER_INPUT", ("maxPrice",)),
    ("decimal-float", PRODUCTS_F, {"f": {"maxPrice": 12.5}}, "BAD_USER_INPUT", ("maxPrice",)),
    ("datetime-no-offset", ORDERS_F, {"f": {"createdAfter": "2025-01-01T00:00:00"}},
     "BAD_USER_INPUT", ("createdAfter", "offset")),
    ("datetime-garbage", ORDERS_F, {"f": {"createdBefore": "yesterday"}}, "BAD_USER_INPUT",
     ("createdBefore",)),
    ("enum", ORDERS_F, {"f": {"status": ["SHIPPED"]}}, "BAD_USER_INPUT", ("SHIPPED",)),
    ("int-variable", "query($n: Int) { products(first: $n) { totalCount } }", {"n": "ten"},
     "BAD_USER_INPUT", ("ten",)),
    ("variable-type", "query($n: String) { products(first: $n) { totalCount } }", {"n": "1"},
     "GRAPHQL_VALIDATION_FAILED", ("$n",)),
    ("missing-variable", "query($s: String!) { productBySku(sku: $s) { id } }", {},
     "BAD_USER_INPUT", ("$s",)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("query", "variables", "code", "mentions"),
    [c[1:] for c in DOCUMENT_CASES],
    ids=[c[0] for c in DOCUMENT_CASES],
)
async def test_refused_documents(
    client: httpx.AsyncClient, query: str, variables: Json, code: str, mentions: tuple[str, ...]
) -> None:
    expect(await graphql_error(client, query, variables), code, *mentions)


async def test_nul_bytes_in_strings_are_bad_input(client: httpx.AsyncClient) -> None:
    """PostgreSQL text cannot hold NUL: refuse it as input instead of failing in the driver."""
    for query in (
        "query($s: String!) { productBySku(sku: $s) { id } }",
        "query($s: String!) { orderByNumber(number: $s) { id } }",
        "query($s: String) { products(filter: {search: $s}) { totalCount } }",
        "query($s: String) { customers(filter: {search: $s}) { totalCount } }",
        "query($s: String!) { products(filter: {skus: [$s]}) { totalCount } }",
    ):
        error = await graphql_error(client, query, {"s": "a\u0000b"})
        assert error["extensions"]["code"] == "BAD_USER_INPUT", error


def nested(depth: int) -> str:
    """orders → edges → node → lines → order → lines → …, the deepest field at ``depth``."""
    inner = "id"
    for level in range(depth - 1, 2, -1):
        inner = f"lines {{ {inner} }}" if level % 2 else f"order {{ {inner} }}"
    return f"{{ orders(first: 1) {{ edges {{ node {{ {inner} }} }} }} }}"


def aliased(n: int) -> str:
    return "{ " + " ".join(f"a{i}: warehouses(first: 1) {{ totalCount }}" for i in range(n)) + " }"


def tokens(n: int) -> str:
    """A valid document of about ``n`` tokens (one per SKU string; 14 around them)."""
    skus = " ".join(f'"S{i}"' for i in range(n - 14))
    return f"{{ products(filter: {{skus: [{skus}]}}) {{ totalCount }} }}"


LIMITS = [
    # (document within the limit, document over it, code, words of the message)
    (nested(12), nested(13), "GRAPHQL_VALIDATION_FAILED", ("depth", "12")),
    (nested(12), nested(40), "GRAPHQL_VALIDATION_FAILED", ("depth", "12")),
    (aliased(30), aliased(31), "GRAPHQL_VALIDATION_FAILED", ("aliases", "30")),
    (tokens(4_990), tokens(5_010), "GRAPHQL_PARSE_FAILED", ("tokens", "5000")),
]


@pytest.mark.parametrize(
    ("within", "over", "code", "mentions"), LIMITS, ids=["depth", "deep", "aliases", "tokens"]
)
async def test_document_limits(
    client: httpx.AsyncClient, within: str, over: str, code: str, mentions: tuple[str, ...]
) -> None:
    accepted = await client.post("/graphql", json={"query": within})
    assert accepted.status_code == 200 and "errors" not in accepted.json(), accepted.text[:300]
    expect(await graphql_error(client, over), code, *mentions)


# -- malformed HTTP requests: a 4xx with a JSON error body


async def raw(
    client: httpx.AsyncClient, content: bytes | AsyncIterator[bytes], content_type: str
) -> httpx.Response:
    return await client.post("/graphql", content=content, headers={"content-type": content_type})


JSON = "application/json"
HTTP_CASES = [  # (case, body, content type, a word of the message); all are 400 BAD_REQUEST
    ("not-json", b"{not json", JSON, "json"),
    ("not-utf8", b"\xff\xfe\x00", JSON, "json"),
    ("json-number", b"42", JSON, "json"),
    ("json-string", b'"query"', JSON, "json"),
    ("json-null", b"null", JSON, "json"),
    ("empty-batch", b"[]", JSON, "batch"),
    ("no-query", b"{}", JSON, "query"),
    ("query-not-string", b'{"query": 5}', JSON, "query"),
    ("variables-not-object", b'{"query": "{ __typename }", "variables": [1]}', JSON, "variables"),
]
#: Bodies a browser may send cross-site without a preflight: refused (CSRF), 415.
CSRF_CASES = [
    ("text-plain", b"{ __typename }", "text/plain"),
    ("form", b"query={ __typename }", "application/x-www-form-urlencoded"),
    ("multipart", b"--x\r\n\r\n--x--", "multipart/form-data; boundary=x"),
]


@pytest.mark.parametrize(
    ("content", "content_type", "mention"),
    [c[1:] for c in HTTP_CASES],
    ids=[c[0] for c in HTTP_CASES],
)
async def test_malformed_http_requests(
    client: httpx.AsyncClient, content: bytes, content_type: str, mention: str
) -> None:
    response = await raw(client, content, content_type)
    assert response.status_code == 400, response.text
    expect(error_of(response), "BAD_REQUEST", mention)


@pytest.mark.parametrize(
    ("content", "content_type"), [c[1:] for c in CSRF_CASES], ids=[c[0] for c in CSRF_CASES]
)
async def test_simple_cross_site_bodies_are_refused(
    client: httpx.AsyncClient, content: bytes, content_type: str
) -> None:
    response = await raw(client, content, content_type)
    assert response.status_code == 415, response.text
    expect(error_of(response), "UNSUPPORTED_MEDIA_TYPE", "application/json")


async def test_get_never_runs_a_mutation(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    mutation = (
        'mutation { createProduct(input: {sku: "BAD-INPUT-GET-1", name: "Via GET", '
        'unitPrice: "1.00"}) { product { id } errors { code } } }'
    )
    response = await client.get("/graphql", params={"query": mutation})
    error = error_of(response)
    assert (response.status_code, error["extensions"]["code"]) in (
        (400, "BAD_REQUEST"),
        (405, "METHOD_NOT_ALLOWED"),  # what the GraphQL-over-HTTP spec asks for
    )
    assert "mutation" in error["message"].lower()
    assert await db.fetchval("SELECT count(*) FROM products WHERE sku = 'BAD-INPUT-GET-1'") == 0


async def test_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    padding = "x" * 1_000_001
    body = json.dumps({"query": "{ __typename }", "variables": {"pad": padding}}).encode()
    declared = await raw(client, body, "application/json")
    assert declared.status_code == 413, declared.text[:300]
    expect(error_of(declared), "REQUEST_TOO_LARGE", "1000000")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit counts bytes
        for start in range(0, len(body), 65_536):
            yield body[start : start + 65_536]

    streamed = await raw(client, chunks(), "application/json")
    assert streamed.status_code == 413, streamed.text[:300]
    expect(error_of(streamed), "REQUEST_TOO_LARGE")
    just_under = json.dumps({"query": "{ __typename }", "variables": {"pad": "x" * 900_000}})
    assert (await raw(client, just_under.encode(), "application/json")).status_code == 200

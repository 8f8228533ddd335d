"""Keyset pagination of every connection, checked against the same ORDER BY in SQL.

A forward walk (``first``/``after``) and a backward walk (``last``/``before``) with a small page
size must each visit every row exactly once, in the order of ``ORDER BY <key> <dir>, id <dir>``
(the backward walk in exact reverse), with consistent ``pageInfo`` and ``totalCount`` on every
page. The seed has equal prices and equal timestamps, and the tests check that a run of equal
sort keys straddles a page boundary, so the ``id`` tie-breaker is really exercised.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import gql

PAGE_INFO = "pageInfo { hasNextPage hasPreviousPage startCursor endCursor }"
CONNECTION = f"totalCount edges {{ cursor node {{ id }} }} {PAGE_INFO}"
PAGE_ARGS = "first: $first, after: $after, last: $last, before: $before"
PAGE_VARS = "$first: Int, $after: String, $last: Int, $before: String"


def gid(type_name: str, pk: int) -> str:
    return base64.urlsafe_b64encode(f"{type_name}:{pk}".encode()).decode().rstrip("=")


def pk_of(global_id: str, type_name: str) -> int:
    raw = base64.urlsafe_b64decode(global_id + "=" * (-len(global_id) % 4)).decode()
    name, _, pk = raw.partition(":")
    assert name == type_name, raw
    return int(pk)


@dataclass(frozen=True)
class Case:
    """One connection: how to ask for it, and the SQL that lists its ids in order."""

    name: str
    field: str
    node_type: str
    sql: str  # ids in the expected order; ``$1`` is the parent pk for nested connections
    args: str = ""  # extra GraphQL arguments of the connection field
    parent_type: str | None = None
    parents_sql: str | None = None  # pks of a few parents to walk
    size: int = 7

    def query(self) -> str:
        extra = f", {self.args}" if self.args else ""
        inner = f"{self.field}({PAGE_ARGS}{extra}) {{ {CONNECTION} }}"
        if self.parent_type is None:
            return f"query({PAGE_VARS}) {{ {inner} }}"
        return (
            f"query({PAGE_VARS}, $parent: ID!) "
            f"{{ node(id: $parent) {{ ... on {self.parent_type} {{ {inner} }} }} }}"
        )


def product_cases() -> list[Case]:
    columns = {"NAME": "name", "SKU": "sku", "PRICE": "unit_price", "CREATED_AT": "created_at"}
    return [
        Case(
            f"products-{field}-{direction}",
            "products",
            "Product",
            f"SELECT id FROM products ORDER BY {column} {direction}, id {direction}",
            f"orderBy: {{field: {field}, direction: {direction}}}",
        )
        for field, column in columns.items()
        for direction in ("ASC", "DESC")
    ]


def order_cases() -> list[Case]:
    columns = {"CREATED_AT": "created_at", "NUMBER": "number", "TOTAL": "total"}
    return [
        Case(
            f"orders-{field}-{direction}",
            "orders",
            "Order",
            f"SELECT id FROM orders ORDER BY {column} {direction}, id {direction}",
            f"orderBy: {{field: {field}, direction: {direction}}}",
            size=11,
        )
        for field, column in columns.items()
        for direction in ("ASC", "DESC")
    ]


# Customers with the most, an average number of, and the fewest orders (ties broken by id).
BUSY_CUSTOMERS = """
    (SELECT c.id FROM customers c LEFT JOIN {table} t ON t.customer_id = c.id
     GROUP BY c.id ORDER BY count(t.id) DESC, c.id LIMIT 1)
    UNION ALL
    (SELECT c.id FROM customers c LEFT JOIN {table} t ON t.customer_id = c.id
     GROUP BY c.id ORDER BY count(t.id) ASC, c.id LIMIT 1)
    UNION ALL (SELECT id FROM customers ORDER BY id LIMIT 1 OFFSET 17)
"""
LOW = "on_hand - reserved <= low_stock_threshold"
SOME_PRODUCTS = range(1, 40, 3)
IN_PRODUCTS = f"product_id IN ({', '.join(map(str, SOME_PRODUCTS))})"


def ids(type_name: str, *pks: int) -> str:
    """A GraphQL list literal of global ids."""
    return "[" + ", ".join(f'"{gid(type_name, pk)}"' for pk in pks) + "]"


CASES = [
    *product_cases(),
    Case("products-default", "products", "Product", "SELECT id FROM products ORDER BY name, id"),
    *order_cases(),
    Case(
        "orders-default",
        "orders",
        "Order",
        "SELECT id FROM orders ORDER BY created_at DESC, id DESC",
        size=13,
    ),
    Case("customers", "customers", "Customer", "SELECT id FROM customers ORDER BY name, id"),
    Case(
        "warehouses",
        "warehouses",
        "Warehouse",
        "SELECT id FROM warehouses ORDER BY code, id",
        size=1,
    ),
    Case(
        "stockLevels",
        "stockLevels",
        "StockLevel",
        "SELECT id FROM stock_levels ORDER BY id",
        size=23,
    ),
    Case(
        "stockLevels-onlyLow",
        "stockLevels",
        "StockLevel",
        f"SELECT id FROM stock_levels WHERE {LOW} ORDER BY id",
        "filter: {onlyLow: true}",
    ),
    *[
        Case(
            f"stockLevels-{name}",
            "stockLevels",
            "StockLevel",
            f"SELECT id FROM stock_levels WHERE {condition} ORDER BY id",
            f"filter: {{{flt}}}",
            size=size,
        )
        for name, flt, condition, size in (
            ("products", f"productIds: {ids('Product', *SOME_PRODUCTS)}", IN_PRODUCTS, 4),
            ("warehouses", f"warehouseIds: {ids('Warehouse', 2, 3)}", "warehouse_id IN (2, 3)", 17),
            (
                "products-warehouses-low",
                f"productIds: {ids('Product', *range(1, 120))}, "
                f"warehouseIds: {ids('Warehouse', 1, 4)}, onlyLow: true",
                f"product_id < 120 AND warehouse_id IN (1, 4) AND {LOW}",
                3,
            ),
        )
    ],
    Case(
        "quotations",
        "quotations",
        "Quotation",
        "SELECT id FROM quotations ORDER BY created_at DESC, id DESC",
    ),
    *[
        Case(
            f"customer.orders-{field}-{direction}",
            "orders",
            "Order",
            f"SELECT id FROM orders WHERE customer_id = $1 ORDER BY {column} {direction}, "
            f"id {direction}",
            f"orderBy: {{field: {field}, direction: {direction}}}",
            parent_type="Customer",
            parents_sql=BUSY_CUSTOMERS.format(table="orders"),
            size=3,
        )
        for field, column in (
            ("CREATED_AT", "created_at"),
            ("TOTAL", "total"),
            ("NUMBER", "number"),
        )
        for direction in ("ASC", "DESC")
    ],
    Case(
        "customer.orders-default",
        "orders",
        "Order",
        "SELECT id FROM orders WHERE customer_id = $1 ORDER BY created_at DESC, id DESC",
        parent_type="Customer",
        parents_sql=BUSY_CUSTOMERS.format(table="orders"),
        size=3,
    ),
    Case(
        "customer.quotations",
        "quotations",
        "Quotation",
        "SELECT id FROM quotations WHERE customer_id = $1 ORDER BY created_at DESC, id DESC",
        parent_type="Customer",
        parents_sql=BUSY_CUSTOMERS.format(table="quotations"),
        size=2,
    ),
    Case(
        "customer.orders-filtered-TOTAL-DESC",
        "orders",
        "Order",
        "SELECT id FROM orders WHERE customer_id = $1 AND status IN ('PENDING', 'FULFILLED')"
        " ORDER BY total DESC, id DESC",
        "filter: {status: [PENDING, FULFILLED]}, orderBy: {field: TOTAL, direction: DESC}",
        parent_type="Customer",
        parents_sql=BUSY_CUSTOMERS.format(table="orders"),
        size=2,
    ),
    Case(
        "customer.quotations-filtered",
        "quotations",
        "Quotation",
        "SELECT id FROM quotations WHERE customer_id = $1 AND (status IN ('DRAFT', 'REJECTED')"
        " OR (status = 'SENT' AND valid_until > now())) ORDER BY created_at DESC, id DESC",
        "filter: {status: [DRAFT, SENT, REJECTED]}",
        parent_type="Customer",
        parents_sql=BUSY_CUSTOMERS.format(table="quotations"),
        size=1,
    ),
    *[
        Case(
            f"warehouse.stockLevels-onlyLow-{only_low}",
            "stockLevels",
            "StockLevel",
            "SELECT id FROM stock_levels WHERE warehouse_id = $1"
            + (f" AND {LOW}" if only_low else "")
            + " ORDER BY id",
            f"onlyLow: {str(only_low).lower()}",
            parent_type="Warehouse",
            parents_sql="SELECT id FROM warehouses ORDER BY id LIMIT 3",
            size=3 if only_low else 19,
        )
        for only_low in (True, False)
    ],
]


async def fetch(
    client: httpx.AsyncClient, case: Case, parent: int | None, **page: Any
) -> dict[str, Any]:
    variables = dict(page)
    if parent is not None:
        variables["parent"] = gid(case.parent_type or "", parent)
    data = (await gql(client, case.query(), variables))["data"]
    conn: dict[str, Any] = data["node"][case.field] if parent is not None else data[case.field]
    return conn


async def walk(
    client: httpx.AsyncClient, case: Case, parent: int | None, backward: bool
) -> list[dict[str, Any]]:
    pages: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        if backward:
            page = await fetch(client, case, parent, last=case.size, before=cursor)
        else:
            page = await fetch(client, case, parent, first=case.size, after=cursor)
        pages.append(page)
        info = page["pageInfo"]
        if not (info["hasPreviousPage"] if backward else info["hasNextPage"]):
            return pages
        cursor = info["startCursor"] if backward else info["endCursor"]
        assert len(pages) <= 1000, "the walk does not end"


def check_walk(
    pages: list[dict[str, Any]], case: Case, expected: list[int], backward: bool
) -> dict[int, str]:
    """Every page's shape and pageInfo; returns id -> cursor."""
    if not expected:
        assert pages == [
            {
                "totalCount": 0,
                "edges": [],
                "pageInfo": {
                    "hasNextPage": False,
                    "hasPreviousPage": False,
                    "startCursor": None,
                    "endCursor": None,
                },
            }
        ]
        return {}
    assert len(pages) == -(-len(expected) // case.size)
    for i, page in enumerate(pages):
        edges, info = page["edges"], page["pageInfo"]
        first_page, last_page = i == 0, i == len(pages) - 1
        assert page["totalCount"] == len(expected)
        assert 1 <= len(edges) <= case.size
        if not last_page:
            assert len(edges) == case.size
        assert info["startCursor"] == edges[0]["cursor"]
        assert info["endCursor"] == edges[-1]["cursor"]
        if backward:
            assert (info["hasNextPage"], info["hasPreviousPage"]) == (not first_page, not last_page)
        else:
            assert (info["hasPreviousPage"], info["hasNextPage"]) == (not first_page, not last_page)
    in_order = pages[::-1] if backward else pages
    edges = [edge for page in in_order for edge in page["edges"]]
    assert [pk_of(e["node"]["id"], case.node_type) for e in edges] == expected
    return {pk_of(e["node"]["id"], case.node_type): e["cursor"] for e in edges}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_walk_forward_and_backward(
    client: httpx.AsyncClient, db: asyncpg.Pool, case: Case
) -> None:
    parents: list[int | None] = [None]
    if case.parents_sql is not None:
        parents = [r["id"] for r in await db.fetch(case.parents_sql)]
        assert len(parents) >= 2
    walked = 0
    for parent in parents:
        args = (parent,) if parent is not None else ()
        expected = [r["id"] for r in await db.fetch(case.sql, *args)]
        assert len(set(expected)) == len(expected)
        forward = check_walk(await walk(client, case, parent, False), case, expected, False)
        backward = check_walk(await walk(client, case, parent, True), case, expected, True)
        assert forward == backward, "a row has a different cursor in the two walks"
        walked += len(expected)
    assert walked > 2 * case.size, "too little data to prove anything"


TIE_COLUMNS = [
    ("products", "unit_price", "ASC", 7),
    ("products", "unit_price", "DESC", 7),
    ("products", "created_at", "ASC", 7),
    ("products", "created_at", "DESC", 7),
    ("orders", "created_at", "ASC", 11),
    ("orders", "created_at", "DESC", 13),
]


@pytest.mark.parametrize(("table", "column", "direction", "size"), TIE_COLUMNS)
async def test_seed_has_ties_across_page_boundaries(
    db: asyncpg.Pool, table: str, column: str, direction: str, size: int
) -> None:
    """Without equal keys on both sides of a page break the walks above prove little."""
    rows = await db.fetch(
        f"SELECT {column} AS v FROM {table} ORDER BY {column} {direction}, id {direction}"
    )
    values = [r["v"] for r in rows]
    assert len(set(values)) < len(values), f"no equal {table}.{column}"
    straddling = [i for i in range(size, len(values), size) if values[i - 1] == values[i]]
    assert straddling, f"no run of equal {table}.{column} crosses a page of {size}"


PRODUCTS_BY_PRICE = f"""
query({PAGE_VARS}) {{
  products({PAGE_ARGS}, orderBy: {{field: PRICE}}) {{ {CONNECTION} }}
}}
"""


async def products_by_price(client: httpx.AsyncClient, **page: Any) -> dict[str, Any]:
    data: dict[str, Any] = (await gql(client, PRODUCTS_BY_PRICE, page))["data"]["products"]
    return data


async def sql_ids(db: asyncpg.Pool, sql: str) -> list[int]:
    return [r["id"] for r in await db.fetch(sql)]


def ids_of(conn: dict[str, Any], type_name: str = "Product") -> list[int]:
    return [pk_of(e["node"]["id"], type_name) for e in conn["edges"]]


async def test_first_zero_returns_no_edges(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    conn = await products_by_price(client, first=0)
    assert conn["edges"] == []
    assert conn["pageInfo"]["startCursor"] is None
    assert conn["pageInfo"]["endCursor"] is None
    assert conn["totalCount"] == await db.fetchval("SELECT count(*) FROM products")
    assert (await products_by_price(client, last=0))["edges"] == []


async def test_default_page_size_is_20(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    expected = await sql_ids(db, "SELECT id FROM products ORDER BY name, id")
    body = await gql(client, f"{{ products {{ {CONNECTION} }} }}")
    conn = body["data"]["products"]
    assert ids_of(conn) == expected[:20]
    assert conn["pageInfo"]["hasNextPage"] is True
    assert conn["pageInfo"]["hasPreviousPage"] is False
    # `before` alone pages backward from that cursor, also 20 at a time.
    last = await gql(client, f"{{ products(last: 1) {{ {CONNECTION} }} }}")
    cursor = last["data"]["products"]["edges"][0]["cursor"]
    query = f"query($b: String) {{ products(before: $b) {{ {CONNECTION} }} }}"
    back = (await gql(client, query, {"b": cursor}))["data"]["products"]
    assert ids_of(back) == expected[-21:-1]


async def test_first_100_is_allowed(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    expected = await sql_ids(db, "SELECT id FROM products ORDER BY unit_price, id")
    conn = await products_by_price(client, first=100)
    assert ids_of(conn) == expected[:100]
    assert conn["pageInfo"]["hasNextPage"] is (len(expected) > 100)
    tail = await products_by_price(client, last=100)
    assert ids_of(tail) == expected[-100:]
    assert tail["pageInfo"]["hasPreviousPage"] is (len(expected) > 100)


async def test_slices_in_the_middle_match_sql(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    expected = await sql_ids(db, "SELECT id FROM products ORDER BY unit_price, id")
    head = await products_by_price(client, first=61)
    cursors = [e["cursor"] for e in head["edges"]]
    middle = await products_by_price(client, first=11, after=cursors[30])
    assert ids_of(middle) == expected[31:42]
    assert middle["pageInfo"]["hasPreviousPage"] is True
    assert middle["pageInfo"]["hasNextPage"] is True
    before = await products_by_price(client, last=11, before=cursors[60])
    assert ids_of(before) == expected[49:60]
    assert before["pageInfo"]["hasPreviousPage"] is True
    assert before["pageInfo"]["hasNextPage"] is True
    between = await products_by_price(client, first=100, after=cursors[10], before=cursors[20])
    assert ids_of(between) == expected[11:20]
    past_end = await products_by_price(client, last=5, after=cursors[-1])
    assert ids_of(past_end) == expected[-5:]


NESTED_FIRST_PAGES = """
{
  customers(first: 100) {
    edges { node { id
      orders(first: 4, orderBy: {field: TOTAL, direction: ASC}) { CONNECTION }
      quotations(last: 3) { CONNECTION }
    } }
  }
  warehouses { edges { node { id stockLevels(first: 5, onlyLow: true) { CONNECTION } } } }
}
""".replace("CONNECTION", CONNECTION)


def expect_page(
    conn: dict[str, Any], all_ids: list[int], size: int, backward: bool, kind: str
) -> None:
    assert conn["totalCount"] == len(all_ids)
    assert ids_of(conn, kind) == (all_ids[-size:] if backward else all_ids[:size])
    more = len(all_ids) > size
    info = conn["pageInfo"]
    assert (info["hasNextPage"], info["hasPreviousPage"]) == (
        (False, more) if backward else (more, False)
    )


async def test_nested_pages_of_many_parents_in_one_request(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    """One batched statement serves all parents: each parent still gets its own page."""
    data = (await gql(client, NESTED_FIRST_PAGES))["data"]
    orders = await db.fetch("SELECT customer_id, id FROM orders ORDER BY total, id")
    quotes = await db.fetch(
        "SELECT customer_id, id FROM quotations ORDER BY created_at DESC, id DESC"
    )
    low = await db.fetch(f"SELECT warehouse_id, id FROM stock_levels WHERE {LOW} ORDER BY id")
    customers = data["customers"]["edges"]
    assert len(customers) == await db.fetchval("SELECT count(*) FROM customers")
    for edge in customers:
        customer = pk_of(edge["node"]["id"], "Customer")
        mine = [r["id"] for r in orders if r["customer_id"] == customer]
        expect_page(edge["node"]["orders"], mine, 4, False, "Order")
        mine = [r["id"] for r in quotes if r["customer_id"] == customer]
        expect_page(edge["node"]["quotations"], mine, 3, True, "Quotation")
    for edge in data["warehouses"]["edges"]:
        warehouse = pk_of(edge["node"]["id"], "Warehouse")
        mine = [r["id"] for r in low if r["warehouse_id"] == warehouse]
        expect_page(edge["node"]["stockLevels"], mine, 5, False, "StockLevel")

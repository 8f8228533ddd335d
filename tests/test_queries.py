"""Every contract query on the seeded database, field by field, checked against SQL."""

from __future__ import annotations

import base64
import re
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio

from tests.conftest import gql

Json = dict[str, Any]


def gid(type_name: str, pk: int) -> str:
    return base64.urlsafe_b64encode(f"{type_name}:{pk}".encode()).decode().rstrip("=")


def pk_of(global_id: str, type_name: str) -> int:
    raw = base64.urlsafe_b64decode(global_id + "=" * (-len(global_id) % 4)).decode()
    name, _, pk = raw.partition(":")
    assert name == type_name, raw
    return int(pk)


def ref(type_name: str, pk: int | None) -> Json | None:
    return {"id": gid(type_name, pk)} if pk is not None else None


QUOTATIONS = (
    "SELECT q.*, o.id AS order_id, CASE WHEN q.status = 'SENT' AND q.valid_until <= now()"
    " THEN 'EXPIRED' ELSE q.status END AS effective_status"
    " FROM quotations q LEFT JOIN orders o ON o.quotation_id = q.id"
)
STOCK_LEVELS = (
    "SELECT *, on_hand - reserved AS available,"
    " on_hand - reserved <= low_stock_threshold AS is_low FROM stock_levels"
)
MONEY = "currency subtotal discount_total total"

# Node type -> (SQL of all its rows, scalar columns, {reference field: node type}).
# A column's GraphQL field is its camelCase name; a reference `x` is read from column `x_id`.
NODE_TYPES: dict[str, tuple[str, str, dict[str, str]]] = {
    "Product": ("SELECT * FROM products",
                "sku name description category unit_price currency active created_at updated_at",
                {}),
    "Warehouse": ("SELECT * FROM warehouses", "code name", {}),
    "StockLevel": (STOCK_LEVELS, "on_hand reserved available low_stock_threshold is_low updated_at",
                   {"product": "Product", "warehouse": "Warehouse"}),
    "Customer": ("SELECT * FROM customers", "name email tier", {}),
    "Order": ("SELECT * FROM orders", f"number status {MONEY} created_at updated_at",
              {"customer": "Customer", "quotation": "Quotation"}),
    "OrderLine": ("SELECT * FROM order_lines", "quantity unit_price discount line_total",
                  {"order": "Order", "product": "Product"}),
    "Quotation": (QUOTATIONS, f"number effective_status {MONEY} valid_until created_at updated_at",
                  {"customer": "Customer", "order": "Order"}),
    "QuotationLine": ("SELECT * FROM quotation_lines",
                      "quantity unit_price discount_percent line_total",
                      {"quotation": "Quotation", "product": "Product"}),
    "IntegrationJob": ("SELECT * FROM integration_jobs",
                       "kind status attempts last_error external_ref created_at updated_at", {}),
}  # fmt: skip


def camel(column: str) -> str:
    head, *rest = column.removeprefix("effective_").split("_")
    return head + "".join(word.title() for word in rest)


def sel(type_name: str) -> str:
    _, columns, refs = NODE_TYPES[type_name]
    return " ".join(["id", *map(camel, columns.split()), *(f"{f} {{ id }}" for f in refs)])


def node_json(type_name: str, row: asyncpg.Record) -> Json:
    """What the API must answer for ``sel(type_name)`` of this row (decimals as exact strings)."""
    _, columns, refs = NODE_TYPES[type_name]
    out: Json = {"id": gid(type_name, row["id"])}
    for column in columns.split():
        value = row[column]
        if isinstance(value, Decimal):
            value = str(value)
        elif isinstance(value, datetime):
            value = value.isoformat()
        out[camel(column)] = value
    for field, target in refs.items():
        out[field] = ref(target, row[f"{field}_id"])
    return out


Answer = tuple[Json, asyncpg.Record]


async def answers(db: asyncpg.Pool, type_name: str, order_by: str = "id") -> list[Answer]:
    """(expected API answer, SQL row) of every row of a node type."""
    sql = NODE_TYPES[type_name][0]
    rows = await db.fetch(f"SELECT * FROM ({sql}) t ORDER BY {order_by}")
    return [(node_json(type_name, r), r) for r in rows]


# Same-named fields of different types (Order.status vs Quotation.status, Order! vs Order)
# may not meet in one selection: `nodes` asks for them under per-type aliases.
CONFLICTING = ("status", "order", "quotation")


def aliased(type_name: str) -> str:
    selection = sel(type_name)
    for name in CONFLICTING:
        selection = re.sub(rf"\b{name}\b", f"{type_name}_{name}: {name}", selection)
    return f"... on {type_name} {{ {selection} }}"


def unaliased(node: Json | None) -> Json | None:
    if node is None:
        return None
    prefix = f"{node['__typename']}_"
    return {k.removeprefix(prefix): v for k, v in node.items()}


FRAGMENTS = " ".join(aliased(t) for t in NODE_TYPES)


async def expected_nodes(db: asyncpg.Pool, type_name: str, pks: list[int]) -> dict[int, Json]:
    sql = NODE_TYPES[type_name][0]
    rows = await db.fetch(f"SELECT * FROM ({sql}) t WHERE t.id = ANY($1::bigint[])", pks)
    return {r["id"]: {"__typename": type_name, **node_json(type_name, r)} for r in rows}


@pytest_asyncio.fixture
async def integration_job(db: asyncpg.Pool) -> AsyncIterator[tuple[int, int]]:
    """integration_jobs is empty in the seed: one row for the duration of a test."""
    order_id = await db.fetchval("SELECT id FROM orders ORDER BY id LIMIT 1 OFFSET 5")
    job_id = await db.fetchval(
        "INSERT INTO integration_jobs (kind, status, order_id, idempotency_key, attempts,"
        " last_error, external_ref) VALUES ('INVOICE', 'PENDING', $1, $2, 2, 'HTTP 503', 'INV-7')"
        " RETURNING id",
        order_id,
        f"test-queries-{order_id}",
    )
    try:
        yield job_id, order_id
    finally:
        await db.execute("DELETE FROM integration_jobs WHERE id = $1", job_id)


async def some_pks(db: asyncpg.Pool, type_name: str) -> list[int]:
    sql = NODE_TYPES[type_name][0]
    rows = await db.fetch(f"SELECT id FROM ({sql}) t ORDER BY id")
    ids = [r["id"] for r in rows]
    return sorted({ids[0], ids[len(ids) // 2], ids[-1]})


NODE_QUERY = "query($id: ID!) { node(id: $id) { __typename ...F } } fragment F on Node { <f> }"
NODES_QUERY = f"query($ids: [ID!]!) {{ nodes(ids: $ids) {{ __typename {FRAGMENTS} }} }}"


@pytest.mark.parametrize("type_name", list(NODE_TYPES))
async def test_node_by_id(
    client: httpx.AsyncClient,
    db: asyncpg.Pool,
    integration_job: tuple[int, int],
    type_name: str,
) -> None:
    pks = await some_pks(db, type_name)
    expected = await expected_nodes(db, type_name, pks)
    node_query = NODE_QUERY.replace("<f>", f"... on {type_name} {{ {sel(type_name)} }}")
    for pk in pks:
        data = (await gql(client, node_query, {"id": gid(type_name, pk)}))["data"]
        assert data["node"] == expected[pk]
    missing = gid(type_name, max(pks) + 100_000)
    assert (await gql(client, node_query, {"id": missing}))["data"]["node"] is None


async def test_nodes_keeps_order_and_nulls_unknown_ids(
    client: httpx.AsyncClient, db: asyncpg.Pool, integration_job: tuple[int, int]
) -> None:
    wanted: list[tuple[str, int] | None] = []
    for type_name in reversed(NODE_TYPES):
        wanted.append((type_name, (await some_pks(db, type_name))[-1]))
        wanted.append(None)  # a well-formed id of nothing
    wanted.append(("Product", (await some_pks(db, "Product"))[0]))  # repeats are fine
    ids = [gid(*w) if w else gid("Order", 10_000_000 + i) for i, w in enumerate(wanted)]
    ids.append(gid("Invoice", 1))  # a type that does not exist
    data = [unaliased(n) for n in (await gql(client, NODES_QUERY, {"ids": ids}))["data"]["nodes"]]
    expected: list[Json | None] = []
    for w in wanted:
        expected.append((await expected_nodes(db, w[0], [w[1]]))[w[1]] if w else None)
    assert data == [*expected, None]
    single = await gql(client, NODE_QUERY.replace("<f>", "id"), {"id": gid("Invoice", 1)})
    assert single["data"]["node"] is None


async def test_integration_job_of_an_order(
    client: httpx.AsyncClient, db: asyncpg.Pool, integration_job: tuple[int, int]
) -> None:
    job_id, order_id = integration_job
    jobs = f"integrations {{ __typename {sel('IntegrationJob')} }}"
    query = f"query($id: ID!) {{ node(id: $id) {{ ... on Order {{ {jobs} }} }} }}"
    data = (await gql(client, query, {"id": gid("Order", order_id)}))["data"]
    expected = await expected_nodes(db, "IntegrationJob", [job_id])
    assert data["node"]["integrations"] == [expected[job_id]]


async def test_lookups_by_natural_key_and_viewer(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    product = await db.fetchrow("SELECT * FROM products ORDER BY id DESC LIMIT 1")
    order = await db.fetchrow("SELECT * FROM orders WHERE quotation_id IS NOT NULL LIMIT 1")
    query = (
        f"query($sku: String!, $number: String!) {{ viewer {{ role }} "
        f"productBySku(sku: $sku) {{ {sel('Product')} }} "
        f"orderByNumber(number: $number) {{ {sel('Order')} }} }}"
    )
    data = (await gql(client, query, {"sku": product["sku"], "number": order["number"]}))["data"]
    assert data == {
        "viewer": {"role": "ADMIN"},  # the test client's token
        "productBySku": node_json("Product", product),
        "orderByNumber": node_json("Order", order),
    }
    data = (await gql(client, query, {"sku": "NO-SUCH-SKU", "number": "SO-999999"}))["data"]
    assert data == {"viewer": {"role": "ADMIN"}, "productBySku": None, "orderByNumber": None}


async def walk_all(
    client: httpx.AsyncClient,
    field: str,
    selection: str,
    args: str = "",
    variables: str = "",
    values: Json | None = None,
) -> tuple[list[Json], int]:
    """Every node of a root connection (pages of 100) and its totalCount."""
    page = f"totalCount edges {{ node {{ {selection} }} }} pageInfo {{ hasNextPage endCursor }}"
    query = (
        f"query($after: String{variables}) "
        f"{{ {field}(first: 100, after: $after{args}) {{ {page} }} }}"
    )
    nodes: list[Json] = []
    counts: set[int] = set()
    after = None
    while True:
        conn = (await gql(client, query, {**(values or {}), "after": after}))["data"][field]
        nodes += [e["node"] for e in conn["edges"]]
        counts.add(conn["totalCount"])
        if not conn["pageInfo"]["hasNextPage"]:
            break
        after = conn["pageInfo"]["endCursor"]
    assert len(counts) == 1, "totalCount changed between pages"
    return nodes, counts.pop()


def group(children: list[Answer], column: str, **extra: Any) -> dict[int, list[Json]]:
    """Expected answers of child rows by parent id, with ``extra`` fields computed per row."""
    groups: dict[int, list[Json]] = defaultdict(list)
    for answer, row in children:
        groups[row[column]].append(answer | {k: f(row) for k, f in extra.items()})
    return groups


def by_id(items: list[Json], type_name: str) -> list[Json]:
    return sorted(items, key=lambda item: pk_of(item["id"], type_name))


async def test_products_with_stock(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    selection = f"{sel('Product')} availableQuantity stock {{ {sel('StockLevel')} }}"
    nodes, total = await walk_all(client, "products", selection)
    levels = group(await answers(db, "StockLevel"), "product_id")
    expected = []
    for product, row in await answers(db, "Product", "name, id"):
        stock = levels[row["id"]]
        available = sum(s["available"] for s in stock)
        expected.append({**product, "availableQuantity": available, "stock": stock})
    for node in nodes:
        node["stock"] = by_id(node["stock"], "StockLevel")
    assert (total, nodes) == (len(expected), expected)
    assert any(s["isLow"] for n in nodes for s in n["stock"])
    assert any(s["reserved"] > 0 for n in nodes for s in n["stock"])


@pytest.mark.parametrize(
    ("field", "type_name", "order_by"),
    [
        ("warehouses", "Warehouse", "code, id"),
        ("customers", "Customer", "name, id"),
        ("stockLevels", "StockLevel", "id"),
    ],
)
async def test_plain_connections(
    client: httpx.AsyncClient, db: asyncpg.Pool, field: str, type_name: str, order_by: str
) -> None:
    nodes, total = await walk_all(client, field, sel(type_name))
    expected = [answer for answer, _ in await answers(db, type_name, order_by)]
    assert (total, nodes) == (len(expected), expected)


async def test_orders_with_lines_and_allocations(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    allocations = "allocations { quantity warehouse { id code } }"
    lines = f"lines {{ {sel('OrderLine')} {allocations} }}"
    nodes, total = await walk_all(client, "orders", f"{sel('Order')} {lines} integrations {{ id }}")
    allocated: dict[int, list[Json]] = defaultdict(list)
    for r in await db.fetch(
        "SELECT a.*, w.code FROM stock_allocations a JOIN warehouses w ON w.id = a.warehouse_id"
        " ORDER BY a.order_line_id, a.warehouse_id"
    ):
        warehouse = {"id": gid("Warehouse", r["warehouse_id"]), "code": r["code"]}
        allocated[r["order_line_id"]].append({"quantity": r["quantity"], "warehouse": warehouse})
    by_order = group(
        await answers(db, "OrderLine"), "order_id", allocations=lambda r: allocated[r["id"]]
    )
    jobs = await db.fetch("SELECT order_id, id FROM integration_jobs ORDER BY id")
    expected = [
        {
            **order,
            "lines": by_order[row["id"]],
            "integrations": [
                ref("IntegrationJob", j["id"]) for j in jobs if j["order_id"] == row["id"]
            ],
        }
        for order, row in await answers(db, "Order", "created_at DESC, id DESC")
    ]
    for node in nodes:
        node["lines"] = by_id(node["lines"], "OrderLine")
        node["integrations"] = by_id(node["integrations"], "IntegrationJob")
        for line in node["lines"]:
            line["allocations"].sort(key=lambda a: pk_of(a["warehouse"]["id"], "Warehouse"))
    assert (total, nodes) == (len(expected), expected)
    assert any(n["quotation"] is not None for n in nodes)
    open_lines = [
        line for n in nodes if n["status"] in ("PENDING", "CONFIRMED") for line in n["lines"]
    ]
    assert open_lines and any(len(line["allocations"]) > 1 for line in open_lines)
    for line in open_lines:
        assert sum(a["quantity"] for a in line["allocations"]) == line["quantity"], line["id"]


async def test_quotations_with_lines_and_orders(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    selection = f"{sel('Quotation')} lines {{ {sel('QuotationLine')} }}"
    nodes, total = await walk_all(client, "quotations", selection)
    lines = group(await answers(db, "QuotationLine"), "quotation_id")
    expected = [
        {**quotation, "lines": lines[row["id"]]}
        for quotation, row in await answers(db, "Quotation", "created_at DESC, id DESC")
    ]
    for node in nodes:
        node["lines"] = by_id(node["lines"], "QuotationLine")
    assert (total, nodes) == (len(expected), expected)
    accepted = [n for n in nodes if n["status"] == "ACCEPTED"]
    assert accepted and all(n["order"] is not None for n in accepted)
    assert all(n["order"] is None for n in nodes if n["status"] in ("DRAFT", "SENT"))
    assert any(n["status"] == "EXPIRED" for n in nodes)


async def test_sent_quotation_past_valid_until_reads_expired(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    row = await db.fetchrow(
        "SELECT id, valid_until FROM quotations WHERE status = 'SENT' AND valid_until > now()"
        " ORDER BY id LIMIT 1"
    )
    assert row is not None, "the seed has no SENT quotation that is still valid"
    qid = gid("Quotation", row["id"])
    query = (
        "query($id: ID!, $s: [QuotationStatus!]) { node(id: $id) { ... on Quotation { status } } "
        "quotations(first: 100, filter: {status: $s}) { edges { node { id } } } }"
    )

    async def state(status: str) -> tuple[str, bool]:
        data = (await gql(client, query, {"id": qid, "s": [status]}))["data"]
        listed = qid in [e["node"]["id"] for e in data["quotations"]["edges"]]
        return data["node"]["status"], listed

    assert await state("SENT") == ("SENT", True)
    await db.execute(
        "UPDATE quotations SET valid_until = now() - interval '1 day' WHERE id = $1", row["id"]
    )
    try:
        assert await state("EXPIRED") == ("EXPIRED", True)
        assert await state("SENT") == ("EXPIRED", False)
    finally:
        await db.execute(
            "UPDATE quotations SET valid_until = $2 WHERE id = $1", row["id"], row["valid_until"]
        )
    assert await state("SENT") == ("SENT", True)


# -- filters -----------------------------------------------------------------------------------


def ids(type_name: str, *pks: int) -> list[str]:
    return [gid(type_name, pk) for pk in pks]


PRODUCT_SEARCH = "(position(lower($1) in lower(name)) > 0 OR position(lower($1) in lower(sku)) > 0)"
CUSTOMER_SEARCH = (
    "(position(lower($1) in lower(name)) > 0 OR position(lower($1) in lower(email)) > 0)"
)
IN_STOCK = "EXISTS (SELECT 1 FROM stock_levels s WHERE s.product_id = t.id AND on_hand > reserved)"
EXPIRED = "(status = 'EXPIRED' OR (status = 'SENT' AND valid_until <= now()))"
LOW = "on_hand - reserved <= low_stock_threshold"
FASTENERS = f"category = 'Fasteners' AND active AND unit_price >= 1 AND {PRODUCT_SEARCH}"
ORDERS_COMBINED = "status IN ('FULFILLED', 'CONFIRMED') AND created_at < $1 AND customer_id = $2"

# (connection, case, GraphQL filter, SQL condition, SQL arguments); "@name" is a fact of the seed.
FILTERS: list[tuple[str, str, Json, str, list[Any]]] = [
    ("products", "search-name", {"search": "bOlT"}, PRODUCT_SEARCH, ["bOlT"]),
    ("products", "search-sku", {"search": "pkg-00"}, PRODUCT_SEARCH, ["pkg-00"]),
    ("products", "search-wildcards-literal", {"search": "%_"}, PRODUCT_SEARCH, ["%_"]),
    ("products", "category", {"category": "Adhesives & Sealants"}, "category = $1", [
        "Adhesives & Sealants"
    ]),
    ("products", "skus", {"skus": ["@sku1", "@sku2", "NO-SUCH"]}, "sku IN ($1, $2)", [
        "@sku1", "@sku2"
    ]),
    ("products", "inactive", {"active": False}, "NOT active", []),
    ("products", "active", {"active": True}, "active", []),
    ("products", "price-range", {"minPrice": "24.99", "maxPrice": "99"}, "unit_price >= 24.99"
     " AND unit_price <= 99", []),
    ("products", "price-bounds-inclusive", {"minPrice": "@tie_price", "maxPrice": "@tie_price"},
     "unit_price = $1", ["@tie_price"]),
    ("products", "in-stock", {"inStock": True}, IN_STOCK, []),
    ("products", "not-in-stock", {"inStock": False}, f"NOT {IN_STOCK}", []),
    ("products", "combined", {"category": "Fasteners", "active": True, "minPrice": "1",
     "search": "NUT"}, FASTENERS, ["NUT"]),
    ("customers", "search-name", {"search": "MARINE"}, CUSTOMER_SEARCH, ["MARINE"]),
    ("customers", "search-email", {"search": "Procurement."}, CUSTOMER_SEARCH, ["Procurement."]),
    ("customers", "tier", {"tier": "GOLD"}, "tier = 'GOLD'", []),
    ("customers", "search-and-tier", {"search": "gmbh", "tier": "STANDARD"},
     f"tier = 'STANDARD' AND {CUSTOMER_SEARCH}", ["gmbh"]),
    ("orders", "status", {"status": ["PENDING", "CANCELLED"]}, "status IN ('PENDING', 'CANCELLED')",
     []),
    ("orders", "customer", {"customerId": "@order_customer_id"}, "customer_id = $1", [
        "@order_customer"
    ]),
    ("orders", "created-range", {"createdAfter": "@t1", "createdBefore": "@t2"},
     "created_at >= $1 AND created_at < $2", ["@t1", "@t2"]),
    ("orders", "created-after-other-offset", {"createdAfter": "@t1_plus2"}, "created_at >= $1", [
        "@t1"
    ]),
    ("orders", "combined", {"status": ["FULFILLED", "CONFIRMED"], "createdBefore": "@t2",
     "customerId": "@order_customer_id"}, ORDERS_COMBINED, ["@t2", "@order_customer"]),
    ("quotations", "sent", {"status": ["SENT"]}, "status = 'SENT' AND valid_until > now()", []),
    ("quotations", "expired", {"status": ["EXPIRED"]}, EXPIRED, []),
    ("quotations", "draft-accepted", {"status": ["DRAFT", "ACCEPTED"]},
     "status IN ('DRAFT', 'ACCEPTED')", []),
    ("quotations", "customer", {"customerId": "@quote_customer_id"}, "customer_id = $1", [
        "@quote_customer"
    ]),
    ("quotations", "customer-expired-or-rejected", {"customerId": "@quote_customer_id",
     "status": ["EXPIRED", "REJECTED"]}, f"customer_id = $1 AND ({EXPIRED} OR status = 'REJECTED')",
     ["@quote_customer"]),
    ("stockLevels", "products", {"productIds": ids("Product", 1, 2, 3, 50)},
     "product_id IN (1, 2, 3, 50)", []),
    ("stockLevels", "warehouses", {"warehouseIds": ids("Warehouse", 2, 4)},
     "warehouse_id IN (2, 4)", []),
    ("stockLevels", "all-three", {"productIds": ids("Product", *range(1, 80)),
     "warehouseIds": ids("Warehouse", 1, 3), "onlyLow": True},
     f"product_id < 80 AND warehouse_id IN (1, 3) AND {LOW}", []),
    ("stockLevels", "only-low", {"onlyLow": True}, LOW, []),
    ("stockLevels", "only-low-false", {"onlyLow": False}, "true", []),
    ("stockLevels", "empty-list", {"productIds": []}, "false", []),
]  # fmt: skip

CONNECTIONS = {  # connection -> (filter type, node type, table, ORDER BY)
    "products": ("ProductFilter", "Product", "products", "name, id"),
    "customers": ("CustomerFilter", "Customer", "customers", "name, id"),
    "orders": ("OrderFilter", "Order", "orders", "created_at DESC, id DESC"),
    "quotations": ("QuotationFilter", "Quotation", "quotations", "created_at DESC, id DESC"),
    "stockLevels": ("StockLevelFilter", "StockLevel", "stock_levels", "id"),
}


async def seed_facts(db: asyncpg.Pool) -> dict[str, Any]:
    created = [r["created_at"] for r in await db.fetch("SELECT created_at FROM orders ORDER BY 1")]
    busiest = "SELECT customer_id FROM {} GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1"
    skus = [r["sku"] for r in await db.fetch("SELECT sku FROM products ORDER BY id LIMIT 2")]
    facts: dict[str, Any] = {
        "sku1": skus[0],
        "sku2": skus[1],
        "tie_price": await db.fetchval(
            "SELECT unit_price FROM products GROUP BY 1 HAVING count(*) > 2 ORDER BY 1 LIMIT 1"
        ),
        "order_customer": await db.fetchval(busiest.format("orders")),
        "quote_customer": await db.fetchval(busiest.format("quotations")),
        "t1": created[100],
        "t1_plus2": created[100].astimezone(timezone(timedelta(hours=2))),
        "t2": created[300],
    }
    facts["order_customer_id"] = gid("Customer", facts["order_customer"])
    facts["quote_customer_id"] = gid("Customer", facts["quote_customer"])
    return facts


def resolve(value: Any, facts: dict[str, Any], as_json: bool) -> Any:
    """Replace "@name" by the fact; for GraphQL variables, in its JSON form."""
    if isinstance(value, dict):
        return {k: resolve(v, facts, as_json) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, facts, as_json) for v in value]
    if isinstance(value, str) and value.startswith("@"):
        value = facts[value[1:]]
        if as_json and isinstance(value, datetime):
            return value.isoformat()
        return str(value) if as_json and isinstance(value, Decimal) else value
    return value


@pytest.mark.parametrize(
    ("field", "flt", "condition", "args"),
    [case[:1] + case[2:] for case in FILTERS],
    ids=[f"{case[0]}-{case[1]}" for case in FILTERS],
)
async def test_filter_matches_sql(
    client: httpx.AsyncClient,
    db: asyncpg.Pool,
    field: str,
    flt: Json,
    condition: str,
    args: list[Any],
) -> None:
    filter_type, type_name, table, order_by = CONNECTIONS[field]
    facts = await seed_facts(db)
    sql = f"SELECT id FROM {table} t WHERE {condition} ORDER BY {order_by}"
    expected = [r["id"] for r in await db.fetch(sql, *resolve(args, facts, False))]
    variables = {"f": resolve(flt, facts, True)}
    nodes, total = await walk_all(
        client, field, "id", ", filter: $f", f", $f: {filter_type}", variables
    )
    assert [pk_of(n["id"], type_name) for n in nodes] == expected
    assert total == len(expected)
    everything = await db.fetchval(f"SELECT count(*) FROM {table}")
    if condition == "false" or "%" in str(flt):
        assert expected == []
    elif condition != "true":
        assert 0 < len(expected) < everything, "a filter that keeps all or nothing proves little"


# -- nested connection filters -----------------------------------------------------------------

ORDERS_OPEN = "status IN ('PENDING', 'CONFIRMED')"
SENT_OR_REJECTED = "((status = 'SENT' AND valid_until > now()) OR status = 'REJECTED')"

# (Customer field, case, GraphQL filter, SQL condition, SQL arguments), as in FILTERS; the
# expected rows are those of the customer that also meet the condition.
NESTED_FILTERS: list[tuple[str, str, Json, str, list[Any]]] = [
    ("orders", "status", {"status": ["PENDING", "CONFIRMED"]}, ORDERS_OPEN, []),
    ("orders", "created-range", {"createdAfter": "@t1", "createdBefore": "@t2"},
     "created_at >= $1 AND created_at < $2", ["@t1", "@t2"]),
    ("orders", "status-and-created-after", {"status": ["FULFILLED"], "createdAfter": "@t1_plus2"},
     "status = 'FULFILLED' AND created_at >= $1", ["@t1"]),
    ("orders", "customer-id", {"customerId": "@order_customer_id"}, "customer_id = $1",
     ["@order_customer"]),
    ("orders", "customer-id-and-status", {"customerId": "@order_customer_id",
     "status": ["CANCELLED", "FULFILLED"]},
     "customer_id = $1 AND status IN ('CANCELLED', 'FULFILLED')", ["@order_customer"]),
    ("quotations", "sent", {"status": ["SENT"]}, "status = 'SENT' AND valid_until > now()", []),
    ("quotations", "expired", {"status": ["EXPIRED"]}, EXPIRED, []),
    ("quotations", "sent-or-rejected", {"status": ["SENT", "REJECTED"]}, SENT_OR_REJECTED,
     []),
    ("quotations", "customer-id", {"customerId": "@quote_customer_id"}, "customer_id = $1",
     ["@quote_customer"]),
    ("quotations", "customer-id-and-status", {"customerId": "@quote_customer_id",
     "status": ["DRAFT", "ACCEPTED"]}, "customer_id = $1 AND status IN ('DRAFT', 'ACCEPTED')",
     ["@quote_customer"]),
]  # fmt: skip

#: Every customer's whole nested list fits one page of this size (asserted), within the cost
#: budget even for several aliased connections.
NESTED_FIRST = 30
NESTED_PAGE = "totalCount edges { node { id } } pageInfo { hasNextPage }"


async def nested_expected(
    db: asyncpg.Pool, field: str, condition: str, args: list[Any], facts: dict[str, Any]
) -> dict[int, list[int]]:
    """Expected ids of the nested connection per customer (every customer, maybe empty)."""
    _, _, table, order_by = CONNECTIONS[field]
    rows = await db.fetch(
        f"SELECT customer_id, id FROM {table} t WHERE {condition} ORDER BY {order_by}",
        *resolve(args, facts, False),
    )
    expected: dict[int, list[int]] = {
        r["id"]: [] for r in await db.fetch("SELECT id FROM customers")
    }
    for r in rows:
        expected[r["customer_id"]].append(r["id"])
    return expected


def nested_ids(conn: Json, type_name: str) -> tuple[list[int], int]:
    assert conn["pageInfo"]["hasNextPage"] is False
    return [pk_of(e["node"]["id"], type_name) for e in conn["edges"]], conn["totalCount"]


@pytest.mark.parametrize(
    ("field", "flt", "condition", "args"),
    [case[:1] + case[2:] for case in NESTED_FILTERS],
    ids=[f"customer.{case[0]}-{case[1]}" for case in NESTED_FILTERS],
)
async def test_nested_filter_matches_sql(
    client: httpx.AsyncClient,
    db: asyncpg.Pool,
    field: str,
    flt: Json,
    condition: str,
    args: list[Any],
) -> None:
    """Every customer's filtered page in one request (the batched path), compared with SQL."""
    filter_type, type_name, table, _ = CONNECTIONS[field]
    facts = await seed_facts(db)
    expected = await nested_expected(db, field, condition, args, facts)
    assert max(map(len, expected.values())) <= NESTED_FIRST, "one page must hold every match"
    query = (
        f"query($f: {filter_type}) {{ customers(first: 100) {{ edges {{ node {{ id "
        f"{field}(first: {NESTED_FIRST}, filter: $f) {{ {NESTED_PAGE} }} }} }} }} }}"
    )
    data = (await gql(client, query, {"f": resolve(flt, facts, True)}))["data"]
    got = {
        pk_of(e["node"]["id"], "Customer"): nested_ids(e["node"][field], type_name)
        for e in data["customers"]["edges"]
    }
    assert got == {customer: (pks, len(pks)) for customer, pks in expected.items()}
    matched = sum(map(len, expected.values()))
    everything = await db.fetchval(f"SELECT count(*) FROM {table}")
    assert 0 < matched < everything, "a filter that keeps all or nothing proves little"
    if "customer_id" not in condition:  # the filter must keep some but not all of a customer's
        unfiltered = await nested_expected(db, field, "true", [], facts)
        assert any(0 < len(expected[c]) < len(unfiltered[c]) for c in expected)


async def test_nested_filters_side_by_side_in_one_request(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    """Aliased nested connections with different filters (and none) each get their own rows."""
    facts = await seed_facts(db)
    cases = [case for case in NESTED_FILTERS if case[0] == "orders"]
    aliases = " ".join(
        f"c{i}: orders(first: {NESTED_FIRST}, filter: $f{i}) {{ {NESTED_PAGE} }}"
        for i in range(len(cases))
    )
    variables = ", ".join(f"$f{i}: OrderFilter" for i in range(len(cases)))
    query = (
        f"query({variables}) {{ customers(first: 100) {{ edges {{ node {{ id "
        f"all: orders(first: {NESTED_FIRST}) {{ {NESTED_PAGE} }} {aliases} }} }} }} }}"
    )
    values = {f"f{i}": resolve(case[2], facts, True) for i, case in enumerate(cases)}
    data = (await gql(client, query, values))["data"]
    for alias, condition, args in [
        ("all", "true", []),
        *((f"c{i}", case[3], case[4]) for i, case in enumerate(cases)),
    ]:
        expected = await nested_expected(db, "orders", condition, args, facts)
        got = {
            pk_of(e["node"]["id"], "Customer"): nested_ids(e["node"][alias], "Order")
            for e in data["customers"]["edges"]
        }
        assert got == {c: (pks, len(pks)) for c, pks in expected.items()}, alias

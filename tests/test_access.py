"""Access control over HTTP: the role matrix, row scoping, attacks refused before execution,
rate limits shared by two instances, and bad tokens."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from starlette.applications import Starlette

from quartermaster.app import create_app
from quartermaster.auth import DEV_SECRET, Role, mint_token
from quartermaster.schema.node import decode_id, encode_id
from tests.conftest import ADMIN, bearer, make_settings
from tests.servers import running_server

Json = dict[str, Any]
REFUSALS = ("UNAUTHENTICATED", "FORBIDDEN")


def gid(type_name: str, pk: int) -> str:
    return encode_id(type_name, pk)


@pytest_asyncio.fixture(scope="module")
async def owner(db: asyncpg.Pool) -> Json:
    """A customer with orders and quotations (the CUSTOMER of these tests), and other people's
    orders, quotations and customer records."""
    cid = await db.fetchval(
        "SELECT c.id FROM customers c WHERE EXISTS (SELECT 1 FROM orders o WHERE o.customer_id"
        " = c.id) AND EXISTS (SELECT 1 FROM quotations q WHERE q.customer_id = c.id"
        " AND q.status IN ('ACCEPTED', 'REJECTED')) ORDER BY c.id LIMIT 1"
    )
    return {
        "id": cid,
        "orders": [
            r[0] for r in await db.fetch("SELECT id FROM orders WHERE customer_id = $1", cid)
        ],
        "quotations": [
            r[0] for r in await db.fetch("SELECT id FROM quotations WHERE customer_id = $1", cid)
        ],
        "other_orders": [
            r[0]
            for r in await db.fetch(
                "SELECT id FROM orders WHERE customer_id <> $1 ORDER BY id LIMIT 200", cid
            )
        ],
        "other_quotations": [
            r[0]
            for r in await db.fetch(
                "SELECT id FROM quotations WHERE customer_id <> $1 ORDER BY id LIMIT 200", cid
            )
        ],
        "other_customers": [
            r[0] for r in await db.fetch("SELECT id FROM customers WHERE id <> $1 LIMIT 200", cid)
        ],
        "other_order_number": await db.fetchval(
            "SELECT number FROM orders WHERE customer_id <> $1 LIMIT 1", cid
        ),
        "product": await db.fetchval("SELECT id FROM products WHERE active ORDER BY id LIMIT 1"),
        # final states, so that no other test can move them: the matrix's targets
        "closed_quotation": await db.fetchval(
            "SELECT id FROM quotations WHERE customer_id = $1 AND status IN ('ACCEPTED',"
            " 'REJECTED') ORDER BY id LIMIT 1",
            cid,
        ),
        "cancelled_order": await db.fetchval(
            "SELECT id FROM orders WHERE status = 'CANCELLED' ORDER BY id LIMIT 1"
        ),
        "warehouse": await db.fetchval("SELECT min(id) FROM warehouses"),
    }


@pytest_asyncio.fixture(scope="module")
async def finished_job(db: asyncpg.Pool) -> AsyncIterator[int]:
    """A SUCCEEDED integration job (retrying it is INVALID_STATE), removed afterwards."""
    job_id: int = await db.fetchval(
        "INSERT INTO integration_jobs (kind, status, idempotency_key, attempts)"
        " VALUES ('SHOP_SYNC', 'SUCCEEDED', $1, 1) RETURNING id",
        f"test-access-{time.time_ns()}",
    )
    try:
        yield job_id
    finally:
        await db.execute("DELETE FROM integration_jobs WHERE id = $1", job_id)


def headers_for(role: str, owner: Json) -> dict[str, str]:
    if role == "ANONYMOUS":
        return {}
    return bearer(role, owner["id"] if role == "CUSTOMER" else None)


async def post(
    client: httpx.AsyncClient,
    query: str,
    variables: Json | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    # The shared client sends an ADMIN token by default; replace it (or drop it) per call.
    request = client.build_request(
        "POST", "/graphql", json={"query": query, "variables": variables or {}}
    )
    del request.headers["authorization"]
    request.headers.update(headers or {})
    return await client.send(request)


# ---------------------------------------------------------------- the matrix

QUERIES = {
    "viewer": "{ viewer { role } }",
    "node": '{ node(id: "UHJvZHVjdDox") { id } }',
    "nodes": '{ nodes(ids: ["UHJvZHVjdDox"]) { id } }',
    "productBySku": '{ productBySku(sku: "X") { id } }',
    "orderByNumber": '{ orderByNumber(number: "SO-000001") { id } }',
    "products": "{ products(first: 1) { totalCount } }",
    "warehouses": "{ warehouses(first: 1) { totalCount } }",
    "stockLevels": "{ stockLevels(first: 1) { totalCount } }",
    "customers": "{ customers(first: 1) { totalCount } }",
    "orders": "{ orders(first: 1) { totalCount } }",
    "quotations": "{ quotations(first: 1) { totalCount } }",
}
#: Each mutation aimed at a real object (the caller's own, for a customer) with an input or a
#: state it refuses: an allowed call runs and answers a UserError that is neither FORBIDDEN nor
#: NOT_FOUND (a customer wrongly refused would get one of those), and nothing is written.
MUTATIONS = {
    "createProduct": 'createProduct(input: {sku: "", name: "", unitPrice: "-1"}) '
    "{ errors { code } }",
    "updateProduct": 'updateProduct(input: {productId: "PRODUCT", unitPrice: "-1"}) '
    "{ errors { code } }",
    "adjustStock": 'adjustStock(input: {productId: "PRODUCT", warehouseId: "WAREHOUSE", delta: 0})'
    " { errors { code } }",
    "placeOrder": 'placeOrder(input: {customerId: "CUSTOMER", lines: []}) { errors { code } }',
    "confirmOrder": 'confirmOrder(input: {orderId: "CANCELLED"}) { errors { code } }',
    "cancelOrder": 'cancelOrder(input: {orderId: "CANCELLED"}) { errors { code } }',
    "fulfillOrder": 'fulfillOrder(input: {orderId: "CANCELLED"}) { errors { code } }',
    "createQuotation": 'createQuotation(input: {customerId: "CUSTOMER", lines: []}) '
    "{ errors { code } }",
    "updateQuotation": 'updateQuotation(input: {quotationId: "CLOSED"}) { errors { code } }',
    "sendQuotation": 'sendQuotation(input: {quotationId: "CLOSED"}) { errors { code } }',
    "rejectQuotation": 'rejectQuotation(input: {quotationId: "CLOSED"}) { errors { code } }',
    "acceptQuotation": 'acceptQuotation(input: {quotationId: "CLOSED"}) { errors { code } }',
    "retryIntegrationJob": 'retryIntegrationJob(input: {jobId: "JOB"}) { errors { code } }',
}
CUSTOMER_MUTATIONS = {"placeOrder", "acceptQuotation", "rejectQuotation"}
STAFF_MUTATIONS = CUSTOMER_MUTATIONS | {
    "adjustStock", "confirmOrder", "cancelOrder", "fulfillOrder", "createQuotation",
    "updateQuotation", "sendQuotation",
}  # fmt: skip
ROLES = ("ANONYMOUS", "CUSTOMER", "STAFF", "ADMIN")


def query_allowed(role: str, field: str) -> bool:
    return field == "viewer" or role != "ANONYMOUS"


def mutation_allowed(role: str, field: str) -> bool:
    return {
        "ANONYMOUS": False,
        "CUSTOMER": field in CUSTOMER_MUTATIONS,
        "STAFF": field in STAFF_MUTATIONS,
        "ADMIN": True,
    }[role]


def outcome(body: Json) -> str:
    codes = [e.get("extensions", {}).get("code") for e in body.get("errors", [])]
    refused = [c for c in codes if c in REFUSALS]
    if refused:
        assert body.get("data") is None, body  # refused before execution: no partial data
        return refused[0]
    assert "errors" not in body, body
    return "allowed"


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("field", sorted(QUERIES))
async def test_every_query_per_role(
    client: httpx.AsyncClient, owner: Json, role: str, field: str
) -> None:
    body = (await post(client, QUERIES[field], headers=headers_for(role, owner))).json()
    expected = "allowed" if query_allowed(role, field) else "UNAUTHENTICATED"
    assert outcome(body) == expected


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("field", sorted(MUTATIONS))
async def test_every_mutation_per_role(
    client: httpx.AsyncClient,
    db: asyncpg.Pool,
    owner: Json,
    finished_job: int,
    role: str,
    field: str,
) -> None:
    before = await db.fetchval("SELECT count(*) FROM outbox")
    text = MUTATIONS[field]
    for placeholder, value in {
        "CUSTOMER": gid("Customer", owner["id"]),
        "PRODUCT": gid("Product", owner["product"]),
        "WAREHOUSE": gid("Warehouse", owner["warehouse"]),
        "CANCELLED": gid("Order", owner["cancelled_order"]),
        "CLOSED": gid("Quotation", owner["closed_quotation"]),
        "JOB": gid("IntegrationJob", finished_job),
    }.items():
        text = text.replace(f'"{placeholder}"', f'"{value}"')
    body = (await post(client, f"mutation {{ {text} }}", headers=headers_for(role, owner))).json()
    if mutation_allowed(role, field):
        assert outcome(body) == "allowed"
        codes = {e["code"] for e in body["data"][field]["errors"]}
        # executed and refused the input or the state, not the caller
        assert codes and codes <= {"INVALID_INPUT", "INVALID_STATE"}, body
    else:
        assert outcome(body) == ("UNAUTHENTICATED" if role == "ANONYMOUS" else "FORBIDDEN")
    assert await db.fetchval("SELECT count(*) FROM outbox") == before  # nothing was written


# ---------------------------------------------------------------- rows a customer may see


async def test_customer_sees_nothing_of_others_through_node_and_nodes(
    client: httpx.AsyncClient, owner: Json
) -> None:
    headers = headers_for("CUSTOMER", owner)
    foreign = (
        [gid("Order", pk) for pk in owner["other_orders"]]
        + [gid("Quotation", pk) for pk in owner["other_quotations"]]
        + [gid("Customer", pk) for pk in owner["other_customers"]]
    )
    assert len(foreign) >= 200
    for start in range(0, len(foreign), 100):  # nodes takes at most 100 ids
        chunk = foreign[start : start + 100]
        body = (
            await post(
                client, "query($ids: [ID!]!) { nodes(ids: $ids) { id } }", {"ids": chunk}, headers
            )
        ).json()
        assert body == {"data": {"nodes": [None] * len(chunk)}}
    for one in foreign[:20]:
        body = (await post(client, f'{{ node(id: "{one}") {{ id }} }}', headers=headers)).json()
        assert body == {"data": {"node": None}}
    mine = [gid("Order", pk) for pk in owner["orders"]]
    body = (
        await post(
            client, "query($ids: [ID!]!) { nodes(ids: $ids) { id } }", {"ids": mine}, headers
        )
    ).json()
    assert [n["id"] for n in body["data"]["nodes"]] == mine


async def test_customer_connections_and_nested_fields_hold_only_their_rows(
    client: httpx.AsyncClient, owner: Json
) -> None:
    headers = headers_for("CUSTOMER", owner)
    me = gid("Customer", owner["id"])
    query = """{
      customers(first: 100) { totalCount edges { node { id } } }
      orders(first: 100) { totalCount edges { node { id customer { id }
        lines { order { customer { id } } } } } }
      quotations(first: 100) { totalCount edges { node { id customer { id } order { id } } } }
      viewer { role customer { id orders(first: 100) { totalCount }
        quotations(first: 100) { totalCount } } }
    }"""
    data = (await post(client, query, headers=headers)).json()["data"]
    assert data["customers"]["totalCount"] == 1
    assert [e["node"]["id"] for e in data["customers"]["edges"]] == [me]
    assert data["orders"]["totalCount"] == len(owner["orders"])
    assert {e["node"]["id"] for e in data["orders"]["edges"]} == {
        gid("Order", pk) for pk in owner["orders"]
    }
    for edge in data["orders"]["edges"]:
        assert edge["node"]["customer"]["id"] == me
        assert all(line["order"]["customer"]["id"] == me for line in edge["node"]["lines"])
    assert data["quotations"]["totalCount"] == len(owner["quotations"])
    assert all(e["node"]["customer"]["id"] == me for e in data["quotations"]["edges"])
    assert data["viewer"]["role"] == "CUSTOMER"
    assert data["viewer"]["customer"]["id"] == me
    assert data["viewer"]["customer"]["orders"]["totalCount"] == len(owner["orders"])
    # someone else's order by number, and someone else's customer record's nested orders
    other = (
        await post(
            client,
            f'{{ orderByNumber(number: "{owner["other_order_number"]}") {{ id }} '
            f'node(id: "{gid("Customer", owner["other_customers"][0])}") '
            "{ ... on Customer { orders(first: 5) { totalCount } } } }",
            headers=headers,
        )
    ).json()
    assert other == {"data": {"orderByNumber": None, "node": None}}


async def test_customer_cannot_see_stock_internals_or_integration_jobs(
    client: httpx.AsyncClient, owner: Json
) -> None:
    headers = headers_for("CUSTOMER", owner)
    ok = (
        await post(
            client,
            "{ products(first: 2) { edges { node { availableQuantity stock "
            "{ available isLow } } } } }",
            headers=headers,
        )
    ).json()
    assert "errors" not in ok
    for query in (
        "{ products(first: 2) { edges { node { stock { onHand } } } } }",
        "{ stockLevels(first: 2) { edges { node { reserved } } } }",
        "{ orders(first: 1) { edges { node { integrations { status } } } } }",
    ):
        assert outcome((await post(client, query, headers=headers)).json()) == "FORBIDDEN"


async def test_customer_may_not_order_for_someone_else_or_touch_their_quotations(
    client: httpx.AsyncClient, db: asyncpg.Pool, owner: Json
) -> None:
    headers = headers_for("CUSTOMER", owner)
    other = gid("Customer", owner["other_customers"][0])
    line = f'{{productId: "{gid("Product", owner["product"])}", quantity: 1}}'
    body = (
        await post(
            client,
            f'mutation {{ placeOrder(input: {{customerId: "{other}", lines: [{line}]}}) '
            "{ order { id } errors { code field } } }",
            headers=headers,
        )
    ).json()
    assert body["data"]["placeOrder"] == {
        "order": None,
        "errors": [{"code": "FORBIDDEN", "field": ["customerId"]}],
    }
    foreign = gid("Quotation", owner["other_quotations"][0])
    missing = gid("Quotation", 999_999_999)
    for name in ("rejectQuotation", "acceptQuotation"):
        answers = []
        for target in (foreign, missing):
            body = (
                await post(
                    client,
                    f'mutation {{ {name}(input: {{quotationId: "{target}"}}) '
                    "{ errors { code field } } }",
                    headers=headers,
                )
            ).json()
            answers.append(body["data"][name]["errors"])
        # someone else's quotation looks exactly like one that does not exist
        assert answers[0] == answers[1] == [{"code": "NOT_FOUND", "field": ["quotationId"]}]


# ---------------------------------------------------------------- customers and anonymous callers


@pytest_asyncio.fixture(scope="module")
async def buyer(db: asyncpg.Pool, owner: Json) -> Json:
    """Another customer, for the tests that write (so ``owner``'s rows stay as counted), and
    products with stock to spare."""
    cid = await db.fetchval(
        "SELECT id FROM customers WHERE id <> $1 ORDER BY id DESC LIMIT 1", owner["id"]
    )
    products = await db.fetch(
        "SELECT p.id FROM products p JOIN stock_levels s ON s.product_id = p.id WHERE p.active"
        " GROUP BY p.id HAVING sum(s.on_hand - s.reserved) >= 10 ORDER BY p.id LIMIT 3"
    )
    return {"id": cid, "products": [r[0] for r in products]}


async def test_customer_places_an_order_for_themselves(
    client: httpx.AsyncClient, db: asyncpg.Pool, buyer: Json
) -> None:
    me = gid("Customer", buyer["id"])
    product = gid("Product", buyer["products"][0])
    body = (
        await post(
            client,
            "mutation($input: PlaceOrderInput!) { placeOrder(input: $input) "
            "{ order { id status customer { id } lines { quantity product { id } } } "
            "errors { code } } }",
            {"input": {"customerId": me, "lines": [{"productId": product, "quantity": 2}]}},
            bearer("CUSTOMER", buyer["id"]),
        )
    ).json()
    assert "errors" not in body, body
    payload = body["data"]["placeOrder"]
    assert payload["errors"] == []
    order = payload["order"]
    assert (order["status"], order["customer"]) == ("PENDING", {"id": me})
    assert order["lines"] == [{"quantity": 2, "product": {"id": product}}]
    order_pk = decode_id(order["id"], "Order")
    assert (
        await db.fetchval("SELECT customer_id FROM orders WHERE id = $1", order_pk) == buyer["id"]
    )


QUOTE = """mutation($input: CreateQuotationInput!) {
  createQuotation(input: $input) { quotation { id } errors { code } } }"""
SEND = """mutation($id: ID!) {
  sendQuotation(input: {quotationId: $id}) { quotation { status } errors { code } } }"""


async def sent_quotation(client: httpx.AsyncClient, buyer: Json, product: int) -> str:
    """A SENT quotation of ``buyer``, made by staff."""
    staff = bearer("STAFF")
    lines = [{"productId": gid("Product", product), "quantity": 1}]
    variables = {"input": {"customerId": gid("Customer", buyer["id"]), "lines": lines}}
    created = (await post(client, QUOTE, variables, staff)).json()["data"]["createQuotation"]
    assert created["errors"] == [], created
    qid: str = created["quotation"]["id"]
    sent = (await post(client, SEND, {"id": qid}, staff)).json()["data"]["sendQuotation"]
    assert sent == {"quotation": {"status": "SENT"}, "errors": []}
    return qid


async def test_customer_accepts_and_rejects_their_own_sent_quotations(
    client: httpx.AsyncClient, buyer: Json, owner: Json
) -> None:
    accepted = await sent_quotation(client, buyer, buyer["products"][1])
    rejected = await sent_quotation(client, buyer, buyer["products"][2])
    me, them = bearer("CUSTOMER", buyer["id"]), headers_for("CUSTOMER", owner)
    accept = (
        "mutation($id: ID!) { acceptQuotation(input: {quotationId: $id}) "
        "{ order { customer { id } quotation { id status } } errors { code } } }"
    )
    reject = (
        "mutation($id: ID!) { rejectQuotation(input: {quotationId: $id}) "
        "{ quotation { id status } errors { code } } }"
    )
    # someone else may not, and their attempt changes nothing
    for query, name in ((accept, "acceptQuotation"), (reject, "rejectQuotation")):
        other = (await post(client, query, {"id": rejected}, them)).json()["data"][name]
        assert [e["code"] for e in other["errors"]] == ["NOT_FOUND"]
    body = (await post(client, accept, {"id": accepted}, me)).json()
    assert body["data"]["acceptQuotation"] == {
        "order": {
            "customer": {"id": gid("Customer", buyer["id"])},
            "quotation": {"id": accepted, "status": "ACCEPTED"},
        },
        "errors": [],
    }
    body = (await post(client, reject, {"id": rejected}, me)).json()
    assert body["data"]["rejectQuotation"] == {
        "quotation": {"id": rejected, "status": "REJECTED"},
        "errors": [],
    }


async def test_anonymous_viewer_is_null(client: httpx.AsyncClient) -> None:
    response = await post(client, "{ viewer { role customer { id } } }")
    assert response.status_code == 200
    assert response.json() == {"data": {"viewer": None}}


CATALOGUE = """query($p: ID!, $c: ID!) {
  products(first: 3) { totalCount edges { node { sku availableQuantity
    stock { available isLow warehouse { code } } } } }
  warehouses(first: 2) { edges { node { code } } }
  stockLevels(first: 2) { edges { node { available product { sku } } } }
  productBySku(sku: "NO-SUCH-SKU") { id }
  product: node(id: $p) { ... on Product { sku } }
  customer: node(id: $c) { id }
}"""


async def test_public_catalogue_opens_catalogue_reads_to_anonymous_callers(
    database_url: str, redis_url: str, client: httpx.AsyncClient, db: asyncpg.Pool, owner: Json
) -> None:
    import dataclasses

    base = make_settings(database_url, redis_url)
    settings = dataclasses.replace(
        base, access=dataclasses.replace(base.access, public_catalogue=True)
    )
    variables = {"p": gid("Product", owner["product"]), "c": gid("Customer", owner["id"])}
    app = create_app(settings, configure_logs=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            opened = await http.post("/graphql", json={"query": CATALOGUE, "variables": variables})
            internals = await http.post(
                "/graphql",
                json={"query": "{ stockLevels(first: 1) { edges { node { onHand } } } }"},
            )
            orders = await http.post("/graphql", json={"query": QUERIES["orders"]})
    assert opened.status_code == 200
    body = opened.json()
    assert "errors" not in body, body
    data = body["data"]
    skus = [r[0] for r in await db.fetch("SELECT sku FROM products ORDER BY name, id LIMIT 3")]
    assert [e["node"]["sku"] for e in data["products"]["edges"]] == skus
    assert data["products"]["totalCount"] == await db.fetchval("SELECT count(*) FROM products")
    assert all(e["node"]["stock"] for e in data["products"]["edges"])
    assert len(data["warehouses"]["edges"]) == 2 and len(data["stockLevels"]["edges"]) == 2
    assert data["productBySku"] is None
    assert data["product"] == {
        "sku": await db.fetchval("SELECT sku FROM products WHERE id = $1", owner["product"])
    }
    assert data["customer"] is None  # the catalogue, nothing else
    assert outcome(internals.json()) == "FORBIDDEN"
    assert outcome(orders.json()) == "UNAUTHENTICATED"
    # the same request without QM_PUBLIC_CATALOGUE (the session's app) is refused
    closed = (await post(client, CATALOGUE, variables)).json()
    assert outcome(closed) == "UNAUTHENTICATED"


# ---------------------------------------------------------------- attacks before execution


@pytest.mark.parametrize(
    ("name", "query", "code"),
    [
        ("depth", "{ orders(first: 1) { edges { node { "
         + "customer { orders(first: 1) { edges { node { " * 6 + "number"
         + " } } } }" * 6 + " } } } }", "GRAPHQL_VALIDATION_FAILED"),
        ("aliases", "{ " + " ".join(f"a{i}: viewer {{ role }}" for i in range(40)) + " }",
         "GRAPHQL_VALIDATION_FAILED"),
        ("tokens", "{ viewer { " + "role " * 6000 + "} }", "GRAPHQL_PARSE_FAILED"),
        ("cost", "{ customers(first: 100) { edges { node { orders(first: 100) { edges { node {"
         " lines { product { name } } } } } } } } }", "QUERY_TOO_COSTLY"),
    ],
)  # fmt: skip
async def test_attacks_are_refused_before_any_resolver_runs(
    app: Starlette, owner: Json, name: str, query: str, code: str
) -> None:
    headers = headers_for("STAFF", owner)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=headers) as http:
        response = await http.post("/graphql", json={"query": query})
    body = response.json()
    errors = body["errors"]
    assert body.get("data") is None, body
    assert [e["extensions"]["code"] for e in errors][:1] == [code], errors
    assert name.rstrip("s") in errors[0]["message"].lower() or name == "cost", errors
    if name == "cost":
        assert errors[0]["extensions"]["code"] == "QUERY_TOO_COSTLY"
        assert errors[0]["extensions"]["cost"] > errors[0]["extensions"]["budget"] == 25_000


async def test_refused_operations_send_no_sql(database_url: str, redis_url: str) -> None:
    """The statement counter of an app that only answers refused operations stays at zero."""
    app = create_app(make_settings(database_url, redis_url), configure_logs=False)
    cost_bomb = (
        "{ customers(first: 100) { edges { node { orders(first: 100) { edges { node {"
        " lines { product { name } } } } } } } } }"
    )
    async with app.router.lifespan_context(app):
        db = app.state.db
        sent: list[str] = []
        db.hooks.append(lambda role: sent.append(role))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            anonymous = await http.post("/graphql", json={"query": QUERIES["orders"]})
            costly = await http.post("/graphql", json={"query": cost_bomb}, headers=bearer("STAFF"))
            batch = await http.post(
                "/graphql", json=[{"query": QUERIES["orders"]}] * 50, headers=bearer("ADMIN")
            )
    assert anonymous.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    assert costly.json()["errors"][0]["extensions"]["code"] == "QUERY_TOO_COSTLY"
    assert batch.status_code == 400  # batching is off: one operation per request
    assert sent == []


# ---------------------------------------------------------------- tokens


async def test_expired_and_tampered_tokens_get_a_clear_401(
    client: httpx.AsyncClient, owner: Json
) -> None:
    from quartermaster.config import Settings

    secret = Settings.from_env().access.token_secret(production=False)
    expired = mint_token(secret, Role.STAFF, ttl_s=60, now=time.time() - 3600)
    header, _payload, signature = mint_token(secret, Role.CUSTOMER, customer_id=1).split(".")
    admin_payload = mint_token(secret, Role.ADMIN).split(".")[1]
    tampered = f"{header}.{admin_payload[:-2]}xx.{signature}"
    cases = {
        "expired": (f"Bearer {expired}", "TOKEN_EXPIRED", "expired"),
        "tampered": (f"Bearer {tampered}", "UNAUTHENTICATED", "not valid"),
        "not-bearer": ("Basic abc", "UNAUTHENTICATED", "bearer"),
    }
    for case, (value, code, word) in cases.items():
        response = await post(client, QUERIES["viewer"], headers={"Authorization": value})
        assert response.status_code == 401, case
        assert response.headers["www-authenticate"].startswith("Bearer"), case
        error = response.json()["errors"][0]
        assert error["extensions"]["code"] == code, (case, error)
        assert word in error["message"].lower(), (case, error)


# ---------------------------------------------------------------- rate limits, two instances


async def test_rate_limit_is_shared_by_two_instances(database_url: str, redis_url: str) -> None:
    env = {
        "QM_DATABASE_URL": database_url,
        "QM_REDIS_URL": redis_url,
        "QM_RATE_LIMITS": "CUSTOMER=6,STAFF=6",
        "QM_RATE_WINDOW_S": "600",
    }
    # a fresh subject per run, so earlier runs' buckets (same Redis) do not count
    subject = f"rate-test-{time.time_ns()}"
    from quartermaster.config import Settings

    secret = Settings.from_env().access.token_secret(production=False)
    token = mint_token(secret, Role.STAFF, subject=subject)
    headers = {"Authorization": f"Bearer {token}"}
    query = {"query": "{ viewer { role } }"}  # costs 1
    with running_server(env) as a, running_server(env) as b:
        async with httpx.AsyncClient(headers=headers, timeout=10) as http:
            answers = [
                (await http.post(f"{base}/graphql", json=query)).status_code
                for base in (a, b, a, b, a, b)
            ]
            assert answers == [200] * 6
            for base in (a, b):
                refused = await http.post(f"{base}/graphql", json=query)
                assert refused.status_code == 429, refused.text
                assert int(refused.headers["retry-after"]) >= 1
                assert refused.json()["errors"][0]["extensions"]["code"] == "RATE_LIMITED"
            # another caller has their own bucket
            other = await http.post(f"{a}/graphql", json=query, headers=bearer("STAFF"))
            assert other.status_code == 200


@pytest_asyncio.fixture(scope="module")
async def staff_client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://t", headers=bearer("STAFF")
    ) as http:
        yield http


async def test_staff_reads_everything_without_extra_sql(
    app: Starlette, staff_client: httpx.AsyncClient, client: httpx.AsyncClient, owner: Json
) -> None:
    """Staff get the same answer as ADMIN from the same statements: their row scope adds none
    (a customer's adds a WHERE, not a statement)."""
    query = (
        "{ orders(first: 20) { edges { node { number customer { name } lines { quantity } } } } }"
    )
    sent: list[str] = []

    def hook(role: str) -> None:
        sent.append(role)

    statements = {}
    app.state.db.hooks.append(hook)
    try:
        for name, http, headers in (
            ("staff", staff_client, None),
            ("admin", client, ADMIN),
            ("customer", client, headers_for("CUSTOMER", owner)),
        ):
            sent.clear()
            response = await http.post("/graphql", json={"query": query}, headers=headers)
            statements[name] = (len(sent), response.json())
    finally:
        app.state.db.hooks.remove(hook)
    (staff_sql, staff), (admin_sql, admin), (customer_sql, mine) = statements.values()
    assert staff == admin and len(staff["data"]["orders"]["edges"]) == 20
    # the orders page, their customers, their lines: one statement each
    assert staff_sql == admin_sql == customer_sql == 3, statements
    assert 0 < len(mine["data"]["orders"]["edges"]) < 20


# ---------------------------------------------------------------- rate limits in one instance


def limited_app(database_url: str, redis_url: str, **limits: int) -> Starlette:
    import dataclasses

    base = make_settings(database_url, redis_url)
    access = dataclasses.replace(
        base.access, rate_limits={"ADMIN": 0, **limits}, rate_window_s=600.0
    )
    return create_app(dataclasses.replace(base, access=access), configure_logs=False)


def an_address() -> str:
    """A client address no earlier run used (buckets outlive a run in the shared Redis)."""
    n = time.time_ns() // 1000
    return f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


async def test_anonymous_callers_are_limited_per_address(database_url: str, redis_url: str) -> None:
    app = limited_app(database_url, redis_url, ANONYMOUS=3)
    query = {"query": "{ viewer { role } }"}  # costs 1
    first, second = an_address(), an_address()
    async with app.router.lifespan_context(app):

        def from_address(address: str) -> httpx.AsyncClient:
            transport = httpx.ASGITransport(app=app, client=(address, 4321))
            return httpx.AsyncClient(transport=transport, base_url="http://t")

        async with from_address(first) as a, from_address(second) as b:
            answers = [(await a.post("/graphql", json=query)).status_code for _ in range(3)]
            refused = await a.post("/graphql", json=query)
            # X-Forwarded-For is not trusted unless configured: no way out of the bucket
            spoofed = await a.post(
                "/graphql", json=query, headers={"X-Forwarded-For": an_address()}
            )
            other = await b.post("/graphql", json=query)
    assert answers == [200, 200, 200]
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    error = refused.json()["errors"][0]
    assert error["extensions"]["code"] == "RATE_LIMITED"
    assert error["extensions"]["retryAfter"] >= 1
    assert spoofed.status_code == 429
    assert other.status_code == 200 and other.json() == {"data": {"viewer": None}}


async def test_a_costly_query_uses_up_more_of_the_limit(database_url: str, redis_url: str) -> None:
    from quartermaster.config import Settings

    app = limited_app(database_url, redis_url, STAFF=100)
    secret = Settings.from_env().access.token_secret(production=False)
    subject = f"cost-test-{time.time_ns()}"
    token = {"Authorization": "Bearer " + mint_token(secret, Role.STAFF, subject=subject)}
    cheap = {"query": "{ viewer { role } }"}  # 1
    costly = {"query": "{ products(first: 20) { edges { node { sku } } } }"}  # 1 + 20 + 20
    async with app.router.lifespan_context(app):
        redis = app.state.redis
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=token) as h:

            async def left() -> float:
                return float(await redis.hget(f"qm:rate:sub:{subject}", "tokens"))

            assert (await h.post("/graphql", json=cheap)).status_code == 200
            after_cheap = await left()
            assert (await h.post("/graphql", json=costly)).status_code == 200
            after_costly = await left()
            assert (await h.post("/graphql", json=costly)).status_code == 200
            refused = await h.post("/graphql", json=costly)  # 41 more than the 17 left
            still = await h.post("/graphql", json=cheap)  # 1 fits
    assert 98.9 <= after_cheap <= 99.1
    assert 40.9 <= after_cheap - after_costly <= 41  # plus a few ms of refill
    assert refused.status_code == 429
    assert refused.json()["errors"][0]["extensions"]["code"] == "RATE_LIMITED"
    assert still.status_code == 200 and "errors" not in still.json()


# ---------------------------------------------------------------- production profile


async def test_production_refuses_a_default_secret_and_hardens_the_endpoint(
    database_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QM_ENV=production alone (nothing else switched off) is the hardened profile."""
    from quartermaster.config import ENV_VARS, Settings

    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QM_ENV", "production")
    monkeypatch.setenv("QM_DATABASE_URL", database_url)
    monkeypatch.setenv("QM_REDIS_URL", redis_url)
    with pytest.raises(ValueError, match="QM_AUTH_SECRET"):
        create_app(Settings.from_env(), configure_logs=False)
    secret = "s" * 48
    monkeypatch.setenv("QM_AUTH_SECRET", secret)
    monkeypatch.setenv("QM_CORS_ORIGINS", "https://shop.example")
    settings = Settings.from_env()
    graphql = settings.graphql
    assert not (graphql.introspection or graphql.field_suggestions or graphql.graphiql)
    app = create_app(settings, configure_logs=False)
    token = {"Authorization": "Bearer " + mint_token(secret, Role.ADMIN)}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            mutation = 'mutation { cancelOrder(input: {orderId: "x"}) { errors { code } } }'
            via_get = await http.get("/graphql", params={"query": mutation}, headers=token)
            form = await http.post("/graphql", data={"query": "{ viewer { role } }"}, headers=token)
            preflight = await http.options(
                "/graphql",
                headers={
                    "Origin": "https://shop.example",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization,content-type",
                },
            )
            foreign = await http.post(
                "/graphql",
                json={"query": "{ viewer { role } }"},
                headers={**token, "Origin": "https://evil.example"},
            )
            # the development secret no longer opens anything
            dev_token = mint_token(DEV_SECRET, Role.ADMIN)
            dev = await http.post(
                "/graphql",
                json={"query": "{ viewer { role } }"},
                headers={"Authorization": f"Bearer {dev_token}"},
            )
            ide = await http.get("/graphql", headers={"accept": "text/html"})
            introspection = await http.post(
                "/graphql", json={"query": "{ __schema { queryType { name } } }"}, headers=token
            )
            typo = await http.post("/graphql", json={"query": "{ productz { id } }"}, headers=token)
            normal = await http.post(
                "/graphql", json={"query": "{ viewer { role } }"}, headers=token
            )
    assert via_get.status_code in (400, 405)
    assert form.status_code == 415
    assert preflight.headers.get("access-control-allow-origin") == "https://shop.example"
    assert "access-control-allow-origin" not in foreign.headers
    assert dev.status_code == 401
    assert ide.status_code == 404
    introspection_error = introspection.json()["errors"][0]
    assert introspection_error["extensions"]["code"] == "GRAPHQL_VALIDATION_FAILED"
    assert "introspection" in introspection_error["message"].lower()
    assert "Did you mean" not in typo.json()["errors"][0]["message"]
    assert normal.json() == {"data": {"viewer": {"role": "ADMIN"}}}


async def test_a_subscription_over_plain_http_gets_a_clear_error(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/graphql", json={"query": "subscription { stockChanged { cursor } }"}
    )
    error = response.json()["errors"][0]
    assert error["extensions"]["code"] == "SUBSCRIPTION_NEEDS_STREAM"
    assert "text/event-stream" in error["message"]

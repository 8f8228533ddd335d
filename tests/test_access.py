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
from quartermaster.auth import Role, mint_token
from quartermaster.schema.node import encode_id
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
        " = c.id) AND EXISTS (SELECT 1 FROM quotations q WHERE q.customer_id = c.id) "
        "ORDER BY c.id LIMIT 1"
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
    }


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
NOWHERE = gid("Order", 999_999_999)
MUTATIONS = {  # inputs that touch nothing: unknown ids, so an allowed call answers UserErrors
    "createProduct": 'createProduct(input: {sku: "", name: "", unitPrice: "-1"}) '
    "{ errors { code } }",
    "updateProduct": f'updateProduct(input: {{productId: "{gid("Product", 999_999_999)}"}}) '
    "{ errors { code } }",
    "adjustStock": f'adjustStock(input: {{productId: "{gid("Product", 999_999_999)}", '
    f'warehouseId: "{gid("Warehouse", 999_999_999)}", delta: 1}}) {{ errors {{ code }} }}',
    "placeOrder": 'placeOrder(input: {customerId: "CUSTOMER", lines: []}) { errors { code } }',
    "confirmOrder": f'confirmOrder(input: {{orderId: "{NOWHERE}"}}) {{ errors {{ code }} }}',
    "cancelOrder": f'cancelOrder(input: {{orderId: "{NOWHERE}"}}) {{ errors {{ code }} }}',
    "fulfillOrder": f'fulfillOrder(input: {{orderId: "{NOWHERE}"}}) {{ errors {{ code }} }}',
    "createQuotation": 'createQuotation(input: {customerId: "CUSTOMER", lines: []}) '
    "{ errors { code } }",
    "updateQuotation": f'updateQuotation(input: {{quotationId: "{gid("Quotation", 999_999_999)}"}})'
    " { errors { code } }",
    "sendQuotation": f'sendQuotation(input: {{quotationId: "{gid("Quotation", 999_999_999)}"}}) '
    "{ errors { code } }",
    "rejectQuotation": f'rejectQuotation(input: {{quotationId: "{gid("Quotation", 999_999_999)}"}})'
    " { errors { code } }",
    "acceptQuotation": f'acceptQuotation(input: {{quotationId: "{gid("Quotation", 999_999_999)}"}})'
    " { errors { code } }",
    "retryIntegrationJob": f'retryIntegrationJob(input: {{jobId: "{gid("IntegrationJob", 9**9)}"}})'
    " { errors { code } }",
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
    client: httpx.AsyncClient, db: asyncpg.Pool, owner: Json, role: str, field: str
) -> None:
    before = await db.fetchval("SELECT count(*) FROM outbox")
    text = MUTATIONS[field].replace("CUSTOMER", gid("Customer", owner["id"]))
    body = (await post(client, f"mutation {{ {text} }}", headers=headers_for(role, owner))).json()
    if mutation_allowed(role, field):
        assert outcome(body) == "allowed"
        assert body["data"][field]["errors"], body  # executed, and refused the bad input
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
    staff_client: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    query = (
        "{ orders(first: 20) { edges { node { number customer { name } lines { quantity } } } } }"
    )
    staff = (await staff_client.post("/graphql", json={"query": query})).json()
    admin = (await client.post("/graphql", json={"query": query}, headers=ADMIN)).json()
    assert staff == admin and len(staff["data"]["orders"]["edges"]) == 20


# ---------------------------------------------------------------- production profile


async def test_production_refuses_a_default_secret_and_hardens_the_endpoint(
    database_url: str, redis_url: str
) -> None:
    import dataclasses

    base = make_settings(database_url, redis_url)
    with pytest.raises(ValueError, match="QM_AUTH_SECRET"):
        create_app(dataclasses.replace(base, env="production"), configure_logs=False)
    secret = "s" * 48
    settings = dataclasses.replace(
        base,
        env="production",
        graphql=dataclasses.replace(
            base.graphql, introspection=False, field_suggestions=False, graphiql=False
        ),
        access=dataclasses.replace(
            base.access, secret=secret, cors_origins=("https://shop.example",)
        ),
    )
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
            dev = await http.post(
                "/graphql", json={"query": "{ viewer { role } }"}, headers=bearer("ADMIN")
            )
            ide = await http.get("/graphql", headers={"accept": "text/html"})
    assert via_get.status_code in (400, 405)
    assert form.status_code == 415
    assert preflight.headers.get("access-control-allow-origin") == "https://shop.example"
    assert "access-control-allow-origin" not in foreign.headers
    assert dev.status_code == 401
    assert ide.status_code == 404


async def test_a_subscription_over_plain_http_gets_a_clear_error(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/graphql", json={"query": "subscription { stockChanged { cursor } }"}
    )
    error = response.json()["errors"][0]
    assert error["extensions"]["code"] == "SUBSCRIPTION_NEEDS_STREAM"
    assert "text/event-stream" in error["message"]

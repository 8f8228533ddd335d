"""Statement counts (dataloaders batch per level) and primary/replica routing."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import pytest_asyncio
from starlette.applications import Starlette

from quartermaster.app import create_app
from tests.conftest import ADMIN, gql, make_settings

NESTED_ORDERS = """
query Orders($n: Int) {
  orders(first: $n) { edges { node {
    number customer { name }
    lines {
      quantity
      product { sku stock { available warehouse { code } } }
      allocations { quantity warehouse { code } }
    }
  } } }
}"""

CUSTOMERS_ORDERS = """
query Customers($n: Int) {
  customers(first: $n) { edges { node { name
    orders(first: 5) { totalCount edges { node { number total } } }
    quotations(first: 2) { edges { node { number } } }
  } } }
}"""


def counting(app: Starlette) -> Iterator[Counter[str]]:
    counter: Counter[str] = Counter()

    def hook(role: str) -> None:
        counter[role] += 1

    app.state.db.hooks.append(hook)
    try:
        yield counter
    finally:
        app.state.db.hooks.remove(hook)


@pytest.fixture
def statements(app: Starlette) -> Iterator[Counter[str]]:
    yield from counting(app)


async def test_nested_orders_cost_the_same_statements_for_5_and_100(
    client: httpx.AsyncClient, statements: Counter[str]
) -> None:
    costs = {}
    for n in (5, 100):
        statements.clear()
        body = await gql(client, NESTED_ORDERS, {"n": n})
        edges = body["data"]["orders"]["edges"]
        assert len(edges) == n
        assert any(line["allocations"] for e in edges for line in e["node"]["lines"])
        costs[n] = sum(statements.values())
    # orders, customers, lines, products, stock levels, allocations, warehouses (stock and
    # allocations may ask for warehouses in two batches at different depths).
    assert costs[5] == costs[100], costs
    assert costs[100] <= 8, costs


async def test_nested_connections_are_one_statement_per_level(
    client: httpx.AsyncClient, statements: Counter[str]
) -> None:
    costs = {}
    for n in (3, 50):
        statements.clear()
        body = await gql(client, CUSTOMERS_ORDERS, {"n": n})
        assert len(body["data"]["customers"]["edges"]) == n
        costs[n] = sum(statements.values())
    # customers page, orders pages (LATERAL), orders counts, quotations pages
    assert costs[3] == costs[50] == 4, costs


async def test_total_count_runs_only_when_selected(
    client: httpx.AsyncClient, statements: Counter[str]
) -> None:
    await gql(client, "{ products(first: 3) { edges { cursor } } }")
    without = sum(statements.values())
    statements.clear()
    await gql(client, "{ products(first: 3) { totalCount edges { cursor } } }")
    assert without == 1
    assert sum(statements.values()) == 2


@pytest_asyncio.fixture(scope="module")
async def replica_app(database_url: str, redis_url: str) -> AsyncIterator[Starlette]:
    # A second URL to the same server: enough to prove which engine each read goes through.
    settings = make_settings(database_url, redis_url, replica_url=database_url)
    application = create_app(settings, configure_logs=False)
    async with application.router.lifespan_context(application):
        yield application


@pytest_asyncio.fixture(scope="module")
async def replica_client(replica_app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=replica_app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", headers=ADMIN
    ) as http:
        yield http


async def test_queries_read_from_the_replica(
    replica_app: Starlette, replica_client: httpx.AsyncClient
) -> None:
    assert replica_app.state.db.replica is not replica_app.state.db.primary
    for counter in counting(replica_app):
        await gql(replica_client, NESTED_ORDERS, {"n": 10})
        await gql(replica_client, CUSTOMERS_ORDERS, {"n": 5})
        assert counter["replica"] >= 10
        assert counter["primary"] == 0


async def test_mutation_payloads_read_from_the_primary(
    replica_app: Starlette, replica_client: httpx.AsyncClient
) -> None:
    sku = f"RT-{uuid.uuid4().hex[:10]}"
    mutation = """
    mutation Create($sku: String!) {
      createProduct(input: {sku: $sku, name: "Routing probe", unitPrice: "3.10"}) {
        product { sku unitPrice stock { warehouse { code } } availableQuantity }
        errors { code }
      }
    }"""
    for counter in counting(replica_app):
        body = await gql(replica_client, mutation, {"sku": sku})
        payload = body["data"]["createProduct"]
        assert payload["errors"] == []
        assert payload["product"]["sku"] == sku
        assert counter["primary"] >= 2  # the INSERT and the payload's reads
        assert counter["replica"] == 0
    # ...and the same product read by a query goes through the replica again.
    for counter in counting(replica_app):
        body = await gql(
            replica_client, "query($s: String!) { productBySku(sku: $s) { sku } }", {"s": sku}
        )
        assert body["data"]["productBySku"] == {"sku": sku}
        assert counter == Counter({"replica": 1})

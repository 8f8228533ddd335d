"""The HTTP edge: GET/POST, GraphiQL, media types, request ids, health, metrics, masking."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
import websockets
from starlette.applications import Starlette

from quartermaster.app import create_app
from quartermaster.config import DatabaseSettings, RedisSettings, Settings
from quartermaster.db.loaders import Loaders
from tests.conftest import ADMIN, make_settings
from tests.servers import free_port, running_server


@contextlib.asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    """An app for ``settings``, started, and an admin client talking to it in-process."""
    app = create_app(settings, configure_logs=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=ADMIN
        ) as http:
            yield app, http


PING = "{ warehouses(first: 1) { totalCount } }"


async def test_get_runs_queries(client: httpx.AsyncClient, db) -> None:
    response = await client.get("/graphql", params={"query": PING})
    assert response.status_code == 200
    count = await db.fetchval("SELECT count(*) FROM warehouses")
    assert response.json() == {"data": {"warehouses": {"totalCount": count}}}


async def test_get_refuses_mutations(client: httpx.AsyncClient, db) -> None:
    before = await db.fetchval("SELECT count(*) FROM products")
    mutation = (
        'mutation { createProduct(input: {sku: "GET-1", name: "x", unitPrice: "1"}) '
        "{ errors { code } } }"
    )
    response = await client.get("/graphql", params={"query": mutation})
    assert response.status_code in (400, 405)
    assert response.json()["errors"][0]["extensions"]["code"] in (
        "BAD_REQUEST",
        "METHOD_NOT_ALLOWED",
    )
    assert await db.fetchval("SELECT count(*) FROM products") == before


async def test_browser_gets_graphiql(client: httpx.AsyncClient) -> None:
    response = await client.get("/graphql", headers={"accept": "text/html"})
    assert response.status_code == 200
    assert "graphiql" in response.text.lower()


async def test_graphql_response_json_media_type(client: httpx.AsyncClient) -> None:
    accept = {"accept": "application/graphql-response+json"}
    ok = await client.post("/graphql", json={"query": PING}, headers=accept)
    assert ok.status_code == 200
    assert ok.headers["content-type"].startswith("application/graphql-response+json")
    bad = await client.post("/graphql", json={"query": "{ nope }"}, headers=accept)
    assert bad.status_code == 400
    assert "data" not in bad.json()
    assert bad.json()["errors"][0]["extensions"]["code"] == "GRAPHQL_VALIDATION_FAILED"
    legacy = await client.post("/graphql", json={"query": "{ nope }"})
    assert legacy.status_code == 200
    assert legacy.headers["content-type"].startswith("application/json")


async def test_request_id_is_returned_and_propagated(client: httpx.AsyncClient) -> None:
    generated = await client.post("/graphql", json={"query": PING})
    assert len(generated.headers["x-request-id"]) >= 16
    given = await client.post("/graphql", json={"query": PING}, headers={"x-request-id": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    hostile = await client.post("/graphql", json={"query": PING}, headers={"x-request-id": "a b\n"})
    assert hostile.headers["x-request-id"] != "a b\n"


async def test_unexpected_exceptions_are_masked(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(self: Loaders) -> object:
        raise RuntimeError("secret connection string postgres://user:pw@db")

    monkeypatch.setattr(Loaders, "product_by_sku", property(explode))
    response = await client.post(
        "/graphql",
        json={"query": '{ productBySku(sku: "x") { sku } }'},
        headers={"x-request-id": "mask-test"},
    )
    assert response.status_code == 200
    error = response.json()["errors"][0]
    assert error["message"] == "Internal server error"
    assert error["extensions"] == {"code": "INTERNAL_SERVER_ERROR", "requestId": "mask-test"}
    assert "secret" not in response.text and "Traceback" not in response.text


async def test_health_and_ready(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    ready = await client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"primary": "ok", "redis": "ok"}


async def test_ready_names_the_failing_part(database_url: str) -> None:
    settings = make_settings(database_url, "redis://127.0.0.1:1/0")
    async with served(settings) as (_, http):
        response = await http.get("/health/ready")
    assert response.status_code == 503
    assert response.json()["failing"] == ["redis"]
    assert response.json()["checks"]["primary"] == "ok"


async def test_ready_names_an_unreachable_primary(redis_url: str) -> None:
    # Nothing listens on a port that was just free, so connecting is refused at once. Start-up
    # does not connect to the primary: the app starts, and readiness is what notices.
    closed = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/quartermaster"
    async with served(make_settings(closed, redis_url)) as (_, http):
        live = await http.get("/health")
        response = await http.get("/health/ready")
    assert live.json() == {"status": "ok"}
    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["primary"]
    assert body["checks"]["primary"].startswith("error: ")
    assert body["checks"]["redis"] == "ok"


PRODUCTS = "{ products(first: 1) { edges { node { sku } } } }"


async def test_unreachable_database_is_service_unavailable_not_a_crash(redis_url: str) -> None:
    closed = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/quartermaster"
    async with served(make_settings(closed, redis_url)) as (_, http):
        response = await http.post(
            "/graphql",
            json={"query": PRODUCTS},
            headers={"X-Request-ID": "db-down"},
        )
    assert response.status_code == 200
    [error] = response.json()["errors"]
    assert error["extensions"] == {"code": "SERVICE_UNAVAILABLE", "requestId": "db-down"}
    assert error["message"] == "The database is busy or unreachable; try again shortly."
    assert "Traceback" not in response.text


async def test_exhausted_pool_is_service_unavailable(database_url: str, redis_url: str) -> None:
    settings = make_settings(database_url, redis_url)
    database = dataclasses.replace(settings.database, pool_size=1, max_overflow=0, pool_timeout=0.2)
    async with served(dataclasses.replace(settings, database=database)) as (app, http):
        # Hold the only connection while a query needs one.
        async with app.state.db.primary.connect() as held:
            await held.exec_driver_sql("SELECT 1")
            busy = await http.post("/graphql", json={"query": PRODUCTS})
        free = await http.post("/graphql", json={"query": PRODUCTS})
    [error] = busy.json()["errors"]
    assert error["extensions"]["code"] == "SERVICE_UNAVAILABLE", error
    assert "errors" not in free.json(), "the same request works once a connection is free"


async def test_metrics_count_operations_statements_and_pool(client: httpx.AsyncClient) -> None:
    await client.post("/graphql", json={"query": "query MetricsProbe " + PING})
    text = (await client.get("/metrics")).text
    assert 'qm_graphql_operations_total{operation="MetricsProbe",outcome="ok",type="query"}' in text
    assert 'qm_graphql_operation_seconds_bucket{le="0.005",operation="MetricsProbe"' in text
    assert 'qm_sql_statements_total{database="primary"}' in text
    assert 'qm_db_pool_checked_out{database="primary"}' in text


@pytest_asyncio.fixture(scope="module")
async def live_server(database_url: str, redis_url: str) -> AsyncIterator[str]:
    with running_server({"QM_DATABASE_URL": database_url, "QM_REDIS_URL": redis_url}) as base:
        yield base


async def test_graphql_transport_ws_is_accepted_on_graphql(live_server: str) -> None:
    url = live_server.replace("http://", "ws://") + "/graphql"
    async with websockets.connect(url, subprotocols=["graphql-transport-ws"]) as ws:
        assert ws.subprotocol == "graphql-transport-ws"
        await ws.send(json.dumps({"type": "connection_init", "payload": {}}))
        ack = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert ack["type"] == "connection_ack"
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "pong"


async def test_legacy_graphql_ws_subprotocol_is_refused(live_server: str) -> None:
    url = live_server.replace("http://", "ws://") + "/graphql"
    async with websockets.connect(url, subprotocols=["graphql-ws"]) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4406


async def test_body_over_limit_is_413_with_code(live_server: str) -> None:
    async with httpx.AsyncClient() as http:
        body = json.dumps({"query": "{ __typename }", "pad": "x" * 1_100_000})
        response = await http.post(
            f"{live_server}/graphql", content=body, headers={"content-type": "application/json"}
        )
    assert response.status_code == 413
    assert response.json()["errors"][0]["extensions"]["code"] == "REQUEST_TOO_LARGE"


@pytest.mark.parametrize("profile", ["development", "test"])
async def test_introspection_is_on_by_default_outside_production(
    database_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch, profile: str
) -> None:
    """The default the switch-off test below departs from: nothing set, introspection works."""
    monkeypatch.setenv("QM_ENV", profile)
    monkeypatch.delenv("QM_INTROSPECTION", raising=False)
    settings = dataclasses.replace(
        Settings.from_env(),
        database=DatabaseSettings(url=database_url, replica_url=None),
        redis=RedisSettings(url=redis_url),
    )
    async with served(settings) as (_, http):
        response = await http.post(
            "/graphql", json={"query": "{ __schema { queryType { name } types { name } } }"}
        )
    assert response.status_code == 200
    body = response.json()
    assert "errors" not in body, body["errors"]
    schema = body["data"]["__schema"]
    assert schema["queryType"] == {"name": "Query"}
    assert {"Order", "Customer", "OrderFilter", "PageInfo"} <= {t["name"] for t in schema["types"]}


async def test_introspection_suggestions_and_graphiql_can_be_switched_off(
    database_url: str, redis_url: str
) -> None:
    settings = make_settings(
        database_url, redis_url, introspection=False, field_suggestions=False, graphiql=False
    )
    async with served(settings) as (_, http):
        introspection = await http.post(
            "/graphql", json={"query": "{ __schema { types { name } } }"}
        )
        typo = await http.post("/graphql", json={"query": "{ productz { totalCount } }"})
        ide = await http.get("/graphql", headers={"accept": "text/html"})
        normal = await http.post("/graphql", json={"query": PING})
    error = introspection.json()["errors"][0]
    assert error["extensions"]["code"] == "GRAPHQL_VALIDATION_FAILED"
    assert "introspection" in error["message"].lower()
    typo_error = typo.json()["errors"][0]
    assert typo_error["extensions"]["code"] == "GRAPHQL_VALIDATION_FAILED"
    assert "Did you mean" not in typo_error["message"]
    assert ide.status_code == 404
    assert "graphiql" not in ide.text.lower()
    assert "errors" not in normal.json()


async def test_suggestions_are_on_in_development(client: httpx.AsyncClient) -> None:
    typo = await client.post("/graphql", json={"query": "{ productz { totalCount } }"})
    assert "Did you mean 'products'?" in typo.json()["errors"][0]["message"]

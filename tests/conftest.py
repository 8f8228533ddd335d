"""Test fixtures: real PostgreSQL and Redis (embedded unless QM_TEST_* URLs are set).

One database per xdist worker, migrated and seeded once per session. Tests that write use their
own unique keys, and every read test compares with SQL run at the time of the test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from sqlalchemy.engine import make_url
from starlette.applications import Starlette

from quartermaster.app import create_app
from quartermaster.auth import Role, mint_token
from quartermaster.config import DatabaseSettings, RedisSettings, Settings, normalize_database_url
from quartermaster.db.migrate import upgrade
from quartermaster.db.seed import SeedConfig, seed_database

#: Fixtures shared by several test modules (the write-path `world`).
pytest_plugins = ["tests.write_support"]

ROOT = Path(__file__).resolve().parents[1]
SMALL_SEED = SeedConfig(
    products=150, warehouses=4, customers=60, orders=400, quotations=100, random_seed=7
)


def asyncpg_kwargs(url: str) -> dict[str, Any]:
    parsed = make_url(url)
    kwargs: dict[str, Any] = {
        "user": parsed.username,
        "password": parsed.password,
        "database": parsed.database,
        "host": parsed.query.get("host") or parsed.host,
        "port": parsed.port,
    }
    return {k: v for k, v in kwargs.items() if v is not None}


def with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Base URLs of a PostgreSQL server and a Redis server for this session."""
    from quartermaster.embedded import start_postgres, start_redis

    pg_url = os.environ.get("QM_TEST_DATABASE_URL")
    redis_url = os.environ.get("QM_TEST_REDIS_URL")
    with ExitStack() as stack:
        if not pg_url:
            # One cluster shared by the xdist workers (pgserver locks and reuses it).
            pg = start_postgres(ROOT / ".qm-data" / "test", database="postgres")
            stack.callback(pg.stop)  # pgserver stops the cluster when its last user leaves
            pg_url = pg.url
        if not redis_url:
            redis = start_redis(tmp_path_factory.mktemp("redis"), persist=False)
            stack.callback(redis.stop)
            redis_url = redis.url
        yield {"database": normalize_database_url(pg_url), "redis": redis_url}


async def _recreate_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(**asyncpg_kwargs(admin_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(**asyncpg_kwargs(admin_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def scratch_database(servers: dict[str, str], worker_id: str) -> Iterator[Callable[[str], str]]:
    """Creates empty databases named for this run and worker; drops them at the end.

    Names carry a per-run id so two test sessions on one server never wipe each other's data.
    """
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID", uuid.uuid4().hex)[:8]
    admin = with_database(servers["database"], "postgres")
    created: list[str] = []

    def create(purpose: str) -> str:
        name = f"qm_{purpose}_{run}_{worker_id}"
        asyncio.run(_recreate_database(admin, name))
        created.append(name)
        return with_database(servers["database"], name)

    yield create
    for name in created:
        asyncio.run(_drop_database(admin, name))


@pytest.fixture(scope="session")
def database_url(scratch_database: Callable[[str], str]) -> str:
    """A freshly created, migrated and seeded database for this worker."""
    url = scratch_database("test")
    upgrade(url)
    asyncio.run(seed_database(url, SMALL_SEED))
    return url


@pytest.fixture(scope="session")
def redis_url(servers: dict[str, str]) -> str:
    return servers["redis"]


def make_settings(database_url: str, redis_url: str, **graphql: Any) -> Settings:
    base = Settings.from_env()
    return dataclasses.replace(
        base,
        env="test",
        database=DatabaseSettings(url=database_url, replica_url=graphql.pop("replica_url", None)),
        redis=RedisSettings(url=redis_url),
        graphql=dataclasses.replace(base.graphql, **graphql),
    )


@pytest_asyncio.fixture(scope="session")
async def app(database_url: str, redis_url: str) -> AsyncIterator[Starlette]:
    application = create_app(make_settings(database_url, redis_url), configure_logs=False)
    async with application.router.lifespan_context(application):
        yield application


def bearer(
    role: str = "ADMIN", customer_id: int | None = None, ttl_s: int = 3600
) -> dict[str, str]:
    """An ``Authorization`` header for ``role``, signed with the secret the servers under test
    use (QM_AUTH_SECRET, or the development secret)."""
    secret = Settings.from_env().access.token_secret(production=False)
    token = mint_token(secret, Role(role), customer_id=customer_id, ttl_s=ttl_s)
    return {"Authorization": f"Bearer {token}"}


#: What most tests send: an ADMIN may do everything (tests/test_access.py covers the roles).
ADMIN = bearer("ADMIN", ttl_s=24 * 3600)


@pytest_asyncio.fixture(scope="session")
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", headers=ADMIN
    ) as http:
        yield http


@pytest_asyncio.fixture(scope="session")
async def db(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A plain asyncpg pool for checking answers against SQL."""
    pool = await asyncpg.create_pool(**asyncpg_kwargs(database_url), min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


async def gql(
    client: httpx.AsyncClient,
    query: str,
    variables: dict[str, Any] | None = None,
    *,
    errors: bool = False,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """POST a GraphQL request; unless ``errors`` is set, fail on any GraphQL error."""
    response = await client.post(
        "/graphql", json={"query": query, "variables": variables or {}}, headers=headers
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    if not errors:
        assert "errors" not in body, body["errors"]
    return body

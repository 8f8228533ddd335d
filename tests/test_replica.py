"""A real primary and a real hot-standby streaming replica (started here, from pgserver's
binaries): read-your-writes tokens, the lag guard, failover to the primary and back.

The replica replays with ``recovery_min_apply_delay = 2s``, so a read that goes to it right
after a write is visibly stale; that is how these tests tell which database answered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError
from starlette.applications import Starlette

from quartermaster.app import create_app
from quartermaster.auth import Role, mint_token
from quartermaster.db.engine import Database
from quartermaster.db.migrate import upgrade
from quartermaster.db.replica import (
    InvalidConsistencyToken,
    decode_token,
    encode_token,
    parse_lsn,
    replica_failure,
)
from quartermaster.db.seed import SeedConfig, seed_database
from quartermaster.embedded import (
    ReplicatedPostgres,
    run_psql,
    start_redis,
    start_replicated_postgres,
)
from tests.conftest import make_settings

ROOT = Path(__file__).resolve().parents[1]
APPLY_DELAY_S = 2.0
PROBE_S = 0.25
TINY_SEED = SeedConfig(
    products=12, warehouses=2, customers=4, orders=6, quotations=2, random_seed=11
)


def _lsn(port: int, sql: str) -> int:
    return parse_lsn(run_psql(port, sql).strip())


def wait_until_replayed(pair: ReplicatedPostgres, timeout: float = 10) -> None:
    target = _lsn(pair.primary.port, "SELECT pg_current_wal_lsn()")
    deadline = time.monotonic() + timeout
    while _lsn(pair.replica.port, "SELECT pg_last_wal_replay_lsn()") < target:
        assert time.monotonic() < deadline, "the replica did not catch up"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def pair() -> Iterator[ReplicatedPostgres]:
    """Primary + replica, migrated and seeded, then the replica restarted with a 2 s delay."""
    data_dir = ROOT / ".qm-data" / "replica-tests" / uuid.uuid4().hex[:10]
    started = time.perf_counter()
    servers = start_replicated_postgres(data_dir, database="qm_replica", durable=False)
    try:
        print(f"replica set-up: {servers.setup_seconds:.2f} s")
        upgrade(servers.primary_url)
        asyncio.run(seed_database(servers.primary_url, TINY_SEED))
        wait_until_replayed(servers)
        servers.stop_replica()
        servers.start_replica(apply_delay_s=APPLY_DELAY_S)
        print(f"replicated, migrated and seeded in {time.perf_counter() - started:.2f} s")
        yield servers
    finally:
        servers.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    redis = start_redis(tmp_path_factory.mktemp("replica-redis"), persist=False)
    try:
        yield redis.url
    finally:
        redis.stop()


def replica_settings(pair: ReplicatedPostgres, redis_url: str, **database: Any) -> Any:
    settings = make_settings(pair.primary_url, redis_url, replica_url=pair.replica_url)
    database = {"replica_probe_s": PROBE_S, "replica_max_lag_s": 30.0, "pool_size": 4, **database}
    settings = dataclasses.replace(
        settings, database=dataclasses.replace(settings.database, **database)
    )
    access = getattr(settings, "access", None)
    if access is not None and hasattr(access, "public_catalogue"):
        # Anonymous reads of the catalogue, whatever the access rules say about the rest.
        settings = dataclasses.replace(
            settings, access=dataclasses.replace(access, public_catalogue=True)
        )
    return settings


def auth_headers(settings: Any) -> dict[str, str]:
    """An ADMIN bearer token (the tests use updateProduct, an ADMIN mutation)."""
    secret = settings.access.token_secret(production=False)
    return {"Authorization": "Bearer " + mint_token(secret, Role.ADMIN)}


@pytest_asyncio.fixture(scope="module")
async def app(pair: ReplicatedPostgres, redis_url: str) -> AsyncIterator[Starlette]:
    application = create_app(replica_settings(pair, redis_url), configure_logs=False)
    async with application.router.lifespan_context(application):
        yield application


@pytest_asyncio.fixture(scope="module")
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    headers = auth_headers(app.state.settings)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", headers=headers
    ) as http:
        yield http


@contextmanager
def counting(app: Starlette) -> Iterator[Counter[str]]:
    """Statements sent per database inside the block (the probe's are not counted)."""
    counter: Counter[str] = Counter()

    def hook(role: str) -> None:
        counter[role] += 1

    app.state.db.hooks.append(hook)
    try:
        yield counter
    finally:
        app.state.db.hooks.remove(hook)


async def post(
    client: httpx.AsyncClient,
    query: str,
    variables: dict[str, Any] | None = None,
    token: str | None = None,
) -> httpx.Response:
    headers = {"X-Consistency-Token": token} if token else {}
    response = await client.post(
        "/graphql", json={"query": query, "variables": variables or {}}, headers=headers
    )
    assert response.status_code == 200, response.text
    assert "errors" not in response.json(), response.json()
    return response


PRODUCT = "query($sku: String!) { productBySku(sku: $sku) { name } }"
RENAME = """
mutation($id: ID!, $name: String!) {
  updateProduct(input: {productId: $id, name: $name}) { product { name } errors { code } }
}"""


async def a_product(client: httpx.AsyncClient) -> dict[str, str]:
    body = (await post(client, "{ products(first: 1) { edges { node { id sku name } } } }")).json()
    node: dict[str, str] = body["data"]["products"]["edges"][0]["node"]
    return node


async def wait_for_replica_reads(app: Starlette, within_s: float) -> float:
    started = time.monotonic()
    while app.state.db.read_target("replica") != "replica":
        assert time.monotonic() - started < within_s, app.state.db.health
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_a_token_reads_your_writes_without_it_the_replica_is_stale(
    app: Starlette, client: httpx.AsyncClient
) -> None:
    await wait_for_replica_reads(app, 10)
    product = await a_product(client)
    new_name = f"Renamed {uuid.uuid4().hex[:8]}"

    response = await post(client, RENAME, {"id": product["id"], "name": new_name})
    token = response.headers["x-consistency-token"]
    body = response.json()
    assert body["extensions"] == {"consistencyToken": token}
    assert body["data"]["updateProduct"] == {"product": {"name": new_name}, "errors": []}
    written_at = time.monotonic()

    # Right away, well inside the replica's 2 s apply delay:
    with counting(app) as counter:
        fresh = await post(client, PRODUCT, {"sku": product["sku"]}, token=token)
        assert counter["replica"] == 0 and counter["primary"] >= 1  # not replayed yet
    with counting(app) as counter:
        stale = await post(client, PRODUCT, {"sku": product["sku"]})
        assert counter["primary"] == 0 and counter["replica"] >= 1
    assert time.monotonic() - written_at < APPLY_DELAY_S, "too slow to prove anything"
    assert fresh.json()["data"]["productBySku"] == {"name": new_name}
    assert stale.json()["data"]["productBySku"] == {"name": product["name"]}

    # Once the replica has replayed the commit, the same token reads from the replica.
    deadline = time.monotonic() + APPLY_DELAY_S + 5
    while True:
        with counting(app) as served:
            again = await post(client, PRODUCT, {"sku": product["sku"]}, token=token)
        if served["replica"] >= 1:
            break
        assert time.monotonic() < deadline, "the token never let reads go to the replica"
        await asyncio.sleep(0.1)
    assert served["primary"] == 0
    assert again.json()["data"]["productBySku"] == {"name": new_name}
    assert time.monotonic() - written_at >= APPLY_DELAY_S * 0.9


async def test_mutation_payloads_are_fresh_whatever_the_replica_delay(
    app: Starlette, client: httpx.AsyncClient
) -> None:
    product = await a_product(client)
    stock = (
        await post(
            client,
            "query($sku: String!) { productBySku(sku: $sku) "
            "{ stock { onHand warehouse { id } } } }",
            {"sku": product["sku"]},
        )
    ).json()["data"]["productBySku"]["stock"][0]
    with counting(app) as counter:
        renamed = await post(client, RENAME, {"id": product["id"], "name": "Fresh payload"})
        adjusted = await post(
            client,
            """mutation($p: ID!, $w: ID!) {
              adjustStock(input: {productId: $p, warehouseId: $w, delta: 7, reason: RECEIPT}) {
                stockLevel { onHand product { name } } errors { code }
              }
            }""",
            {"p": product["id"], "w": stock["warehouse"]["id"]},
        )
        assert counter["replica"] == 0
    assert renamed.json()["data"]["updateProduct"]["product"] == {"name": "Fresh payload"}
    payload = adjusted.json()["data"]["adjustStock"]
    assert payload["errors"] == []
    # At least +7: another test may have adjusted the same level since it was read.
    assert payload["stockLevel"]["onHand"] >= stock["onHand"] + 7
    assert payload["stockLevel"]["product"] == {"name": "Fresh payload"}
    assert renamed.headers["x-consistency-token"] <= adjusted.headers["x-consistency-token"]


async def test_replica_down_reads_go_to_the_primary_and_come_back(
    pair: ReplicatedPostgres, app: Starlette, client: httpx.AsyncClient
) -> None:
    await wait_for_replica_reads(app, 10)
    product = await a_product(client)
    pair.stop_replica()
    try:
        for _ in range(5):  # the first may meet a dead pooled connection: retried on primary
            response = await post(client, PRODUCT, {"sku": product["sku"]})
            assert response.json()["data"]["productBySku"] is not None
        await asyncio.sleep(PROBE_S * 2)
        ready = await client.get("/health/ready")
        assert ready.status_code == 200, ready.text  # a replica outage is not an API outage
        assert ready.json()["status"] == "degraded"
        assert ready.json()["checks"]["replica"].startswith("error")
        assert ready.json()["reads"]["target"] == "primary"
        metrics = (await client.get("/metrics")).text
        assert 'qm_reads_target{database="primary"} 1.0' in metrics
        assert "qm_replica_healthy 0.0" in metrics
        with counting(app) as counter:
            await post(client, PRODUCT, {"sku": product["sku"]})
            assert counter == Counter({"primary": 1})
    finally:
        pair.start_replica()
    # One probe interval at most, plus one probe round (a few ms; more on a busy machine).
    back_after = await wait_for_replica_reads(app, 2 * PROBE_S + 0.2)
    print(f"reads back on the replica {back_after:.2f} s after it accepted connections")
    metrics = (await client.get("/metrics")).text
    assert 'qm_reads_target{database="replica"} 1.0' in metrics
    assert "qm_replica_healthy 1.0" in metrics
    ready = (await client.get("/health/ready")).json()
    assert ready["reads"]["target"] == "replica" and ready["checks"]["replica"] == "ok"
    with counting(app) as counter:
        await post(client, PRODUCT, {"sku": product["sku"]})
        assert counter == Counter({"replica": 1})


def gauge(metrics: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", metrics, re.MULTILINE)
    assert match, f"{name} is not in /metrics"
    return float(match.group(1))


async def observed_lag(client: httpx.AsyncClient) -> tuple[dict[str, Any], tuple[float, float]]:
    """``reads`` of /health/ready, and (lag seconds, lag bytes) of /metrics."""
    ready = await client.get("/health/ready")
    assert ready.status_code == 200, ready.text
    metrics = (await client.get("/metrics")).text
    lag = gauge(metrics, "qm_replica_lag_seconds"), gauge(metrics, "qm_replica_lag_bytes")
    reads: dict[str, Any] = ready.json()["reads"]
    return reads, lag


async def test_replica_lag_shows_in_ready_and_metrics_while_the_delay_is_pending(
    app: Starlette, client: httpx.AsyncClient
) -> None:
    await wait_for_replica_reads(app, 10)
    product = await a_product(client)
    deadline = time.monotonic() + APPLY_DELAY_S + 5
    while True:  # earlier tests' writes may still wait for their delay
        reads, lag = await observed_lag(client)
        if lag == (0, 0) and reads["replicaLagSeconds"] == 0 and reads["replicaLagBytes"] == 0:
            break
        assert time.monotonic() < deadline, (reads, lag)
        await asyncio.sleep(0.05)
    assert set(reads) == {"target", "replicaHealthy", "replicaLagSeconds", "replicaLagBytes"}

    await post(client, RENAME, {"id": product["id"], "name": f"Lagging {uuid.uuid4().hex[:8]}"})
    written_at = time.monotonic()
    ready_lagged = metrics_lagged = False
    peak = 0.0
    while not (ready_lagged and metrics_lagged):  # while the 2 s apply delay is pending
        assert time.monotonic() - written_at < APPLY_DELAY_S, "no lag shown during the delay"
        reads, (seconds, lag_bytes) = await observed_lag(client)
        ready_lagged |= reads["replicaLagSeconds"] > 0 and reads["replicaLagBytes"] > 0
        metrics_lagged |= seconds > 0 and lag_bytes > 0
        peak = max(peak, seconds)
        await asyncio.sleep(0.05)

    while True:  # the delayed commit is replayed: both come back to 0
        reads, (seconds, lag_bytes) = await observed_lag(client)
        peak = max(peak, seconds)
        if (seconds, lag_bytes) == (0, 0) and (
            reads["replicaLagSeconds"],
            reads["replicaLagBytes"],
        ) == (0, 0):
            break
        assert time.monotonic() - written_at < APPLY_DELAY_S + 5, (reads, seconds, lag_bytes)
        await asyncio.sleep(0.05)
    back_after = time.monotonic() - written_at
    print(f"lag peaked at {peak:.2f} s, back to 0 after {back_after:.2f} s")
    assert back_after >= APPLY_DELAY_S * 0.9  # not before the replica replayed the commit
    # The lag shown is the real one: most of the delay (to the probe interval), not more.
    assert APPLY_DELAY_S / 2 <= peak <= APPLY_DELAY_S + 1


async def test_the_lag_is_probed_per_round_not_per_query(
    app: Starlette, client: httpx.AsyncClient
) -> None:
    await wait_for_replica_reads(app, 10)
    product = await a_product(client)
    probes: Counter[str] = Counter()
    hooks = []
    for name, engine in zip(("primary", "replica"), app.state.db.monitor.engines, strict=True):

        def hook(*args: Any, _name: str = name) -> None:
            probes[_name] += 1

        event.listen(engine.sync_engine, "before_cursor_execute", hook)
        hooks.append((engine.sync_engine, hook))
    queries = 0
    try:
        with counting(app) as served:
            started = time.monotonic()
            # At least 200 queries, and long enough for a few probe rounds.
            while queries < 200 or time.monotonic() - started < 4 * PROBE_S:
                await post(client, PRODUCT, {"sku": product["sku"]})
                queries += 1
            elapsed = time.monotonic() - started
    finally:
        for engine, hook in hooks:
            event.remove(engine, "before_cursor_execute", hook)
    rounds = elapsed / PROBE_S
    print(f"{queries} queries in {elapsed:.2f} s ({rounds:.1f} probe intervals): probes {probes}")
    # Each query is its one statement on the replica: no lag check on the request path ...
    assert served == Counter({"replica": queries})
    # ... nor on the probe's connections: one statement per server per round, whatever the
    # number of queries.
    for server in ("primary", "replica"):
        assert rounds / 2 - 1 <= probes[server] <= rounds + 2, (server, probes, rounds)
    assert probes["replica"] < queries / 10


async def test_a_recovery_conflict_is_retried_on_the_primary(
    app: Starlette, client: httpx.AsyncClient
) -> None:
    await wait_for_replica_reads(app, 10)
    product = await a_product(client)
    db: Database = app.state.db

    class Conflict(Exception):
        sqlstate = "40001"

    failures = []

    def cancel_once(*args: Any) -> None:
        if not failures:
            failures.append(args[2])
            raise DBAPIError(
                args[2],
                None,
                Conflict("canceling statement due to conflict with recovery"),
            )

    before = dict(db.health.fallbacks)
    event.listen(db.replica.sync_engine, "before_cursor_execute", cancel_once)
    try:
        with counting(app) as served:
            response = await post(client, PRODUCT, {"sku": product["sku"]})
    finally:
        event.remove(db.replica.sync_engine, "before_cursor_execute", cancel_once)
    assert response.json()["data"]["productBySku"]["name"]
    assert failures and served["primary"] == 1
    assert db.health.fallbacks["conflict"] == before["conflict"] + 1
    assert db.health.healthy  # a conflict is not an outage: the breaker stays closed


async def test_malformed_tokens_are_rejected_and_future_ones_read_the_primary(
    app: Starlette, client: httpx.AsyncClient
) -> None:
    for bad in ("nope", "qm1.123", "qm1.zzzzzzzzzzzzzzzz", "0/3000060"):
        response = await client.post(
            "/graphql", json={"query": "{ __typename }"}, headers={"X-Consistency-Token": bad}
        )
        assert response.status_code == 400
        error = response.json()["errors"][0]
        assert error["extensions"]["code"] == "INVALID_CONSISTENCY_TOKEN"
        assert "X-Consistency-Token" in error["message"]
    product = await a_product(client)
    with counting(app) as counter:
        await post(client, PRODUCT, {"sku": product["sku"]}, token=encode_token(2**62))
        assert counter == Counter({"primary": 1})  # no replica has replayed that far


def test_token_round_trip() -> None:
    for lsn in (0, 1, parse_lsn("16/B374D848"), 2**64 - 1):
        token = encode_token(lsn)
        assert token.startswith("qm1.") and decode_token(token) == lsn
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    for bad in ("", "qm1.", "qm2.0000000000000001", "qm1.00000000000000001"):
        with pytest.raises(InvalidConsistencyToken):
            decode_token(bad)


def test_which_failures_go_to_the_primary() -> None:
    class Orig(Exception):
        def __init__(self, sqlstate: str) -> None:
            self.sqlstate = sqlstate

    def wrapped(state: str) -> DBAPIError:
        return DBAPIError("SELECT 1", None, Orig(state))

    assert replica_failure(wrapped("40001")) == "conflict"
    assert replica_failure(wrapped("57P01")) == "connection"  # admin shutdown
    assert replica_failure(wrapped("08006")) == "connection"
    assert replica_failure(ConnectionRefusedError()) == "connection"
    assert replica_failure(wrapped("57014")) is None  # statement timeout: not the replica's fault
    assert replica_failure(wrapped("42P01")) is None
    assert replica_failure(ValueError()) is None


async def test_the_lag_guard_switches_reads_on_a_tiny_bound(
    pair: ReplicatedPostgres, app: Starlette, redis_url: str
) -> None:
    settings = replica_settings(pair, redis_url, replica_max_lag_s=0.1)
    db = Database.connect(settings.database)
    monitor = db.monitor
    try:
        deadline = time.monotonic() + APPLY_DELAY_S + 5
        await monitor.check()
        while db.health.lag_bytes:  # earlier tests' writes may still wait for their delay
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
            await monitor.check()
        assert db.health.healthy and db.health.lag_seconds == 0
        assert db.read_target("replica") == "replica"

        async with db.primary.begin() as conn:
            await conn.execute(text("UPDATE warehouses SET name = name"))
        await monitor.check()
        assert db.health.lag_bytes > 0
        await asyncio.sleep(0.3)
        await monitor.check()
        assert db.health.lag_seconds >= 0.3
        assert not db.health.healthy and db.read_target("replica") == "primary"
        assert "lag" in (db.health.reason or "")

        while not db.health.healthy:  # the delayed commit is replayed: reads come back
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
            await monitor.check()
        assert db.health.lag_seconds == 0 and db.health.lag_bytes == 0
        assert db.read_target("replica") == "replica"
    finally:
        await db.dispose()


def test_a_pair_restarts_on_its_data_and_keeps_replicating(tmp_path: Path) -> None:
    data_dir = ROOT / ".qm-data" / "replica-tests" / uuid.uuid4().hex[:10]
    try:
        first = start_replicated_postgres(data_dir, database="qm_restart", durable=False)
        try:
            run_psql(
                first.primary.port, "CREATE TABLE t (x int); INSERT INTO t VALUES (1)", "qm_restart"
            )
        finally:
            first.stop()
        again = start_replicated_postgres(data_dir, database="qm_restart", durable=False)
        try:
            assert again.setup_seconds < first.setup_seconds
            run_psql(again.primary.port, "INSERT INTO t VALUES (2)", "qm_restart")
            wait_until_replayed(again)
            assert run_psql(again.replica.port, "SELECT sum(x) FROM t", "qm_restart").strip() == "3"
            recovery = run_psql(again.replica.port, "SELECT pg_is_in_recovery()").strip()
            assert recovery == "t"
        finally:
            again.stop()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)

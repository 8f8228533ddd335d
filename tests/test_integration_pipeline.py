"""The integration pipeline end to end: outbox → relay → Redis streams → workers → partners.

Real PostgreSQL (one database per test, cloned from a migrated template), a redis-server of
each test's own (killed and restarted where the test needs an outage), the sandbox partner on
127.0.0.1, the API in-process and the workers as ``quartermaster worker`` subprocesses, so a
SIGKILL is a real crash. Nothing is mocked; the partner's own records (``/_sandbox/effects``,
``/_sandbox/calls``) prove "exactly one invoice per order". Every wait is a poll with a deadline.

Every test owns its database, Redis, sandbox and processes, so the module runs under
``pytest -n 2`` as well as alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from sqlalchemy.engine import make_url

from quartermaster.app import create_app
from quartermaster.auth import Role, mint_token
from quartermaster.config import DatabaseSettings, JobSettings, Settings
from quartermaster.db.engine import Database
from quartermaster.db.migrate import upgrade
from quartermaster.db.repositories import integration as repo
from quartermaster.enums import IntegrationKind, IntegrationStatus
from quartermaster.schema.node import encode_id
from quartermaster.services.integration import jobs_for_events
from quartermaster.streams import (
    DEAD_LETTER_STREAM,
    JOB_STREAMS,
    WORKER_GROUP,
)
from quartermaster.workers.consumer import trim_acknowledged
from quartermaster.workers.relay import Relay, publish
from quartermaster.workers.retry import BreakerState, CircuitBreaker, backoff_delay
from tests.conftest import asyncpg_kwargs, gql, make_settings, with_database
from tests.pipeline_support import (
    CANCEL,
    RETRY,
    STOCK_PER_LEVEL,
    Catalog,
    Json,
    Pipeline,
    RedisServer,
    Sandbox,
    WorkerProcess,
    clone_database,
    drop_database,
    fill_template,
)
from tests.servers import free_port

INVOICES = JOB_STREAMS[IntegrationKind.INVOICE]
NOTIFICATIONS = JOB_STREAMS[IntegrationKind.NOTIFICATION]


# ---------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Template:
    url: str
    name: str
    admin_url: str
    catalog: Catalog


def make_template(scratch_database: Any, purpose: str) -> Template:
    """A migrated database with warehouses, customers and stocked products, named for
    ``purpose`` (each test module has its own); each test runs on a clone of it
    (``CREATE DATABASE … TEMPLATE``, a few milliseconds)."""
    url = scratch_database(purpose)
    upgrade(url)
    catalog = asyncio.run(fill_template(url))
    name = make_url(url).database
    assert name
    return Template(url, name, with_database(url, "postgres"), catalog)


@pytest.fixture(scope="module")
def template(scratch_database: Any) -> Template:
    return make_template(scratch_database, "pipeline")


_clones = itertools.count(1)


@pytest_asyncio.fixture
async def pipeline(template: Template, tmp_path: Path) -> AsyncIterator[Pipeline]:
    """This test's own database, Redis, sandbox and in-process API; every resource is
    registered for clean-up as soon as it exists, so a failed set-up leaks nothing."""
    async with AsyncExitStack() as stack:
        name = f"{template.name}_{next(_clones)}"
        await clone_database(template.admin_url, template.name, name)
        stack.push_async_callback(drop_database, template.admin_url, name)
        database_url = with_database(template.url, name)
        redis_server = RedisServer(tmp_path / "redis")
        stack.callback(redis_server.stop)
        redis_server.start()
        sandbox = Sandbox()
        stack.callback(sandbox.stop)
        sandbox.start()
        workers: list[WorkerProcess] = []
        # (clean-up runs in reverse: the workers die before the sandbox, Redis and database)
        stack.callback(lambda: [w.close() for w in workers])
        settings = dataclasses.replace(
            make_settings(database_url, redis_server.url),
            database=DatabaseSettings(
                url=database_url, replica_url=None, pool_size=5, max_overflow=5
            ),
        )
        app = create_app(settings, configure_logs=False)
        pg = await asyncpg.create_pool(**asyncpg_kwargs(database_url), min_size=1, max_size=3)
        stack.push_async_callback(pg.close)
        redis = Redis.from_url(redis_server.url)
        stack.push_async_callback(redis.aclose)
        await stack.enter_async_context(app.router.lifespan_context(app))
        api = await stack.enter_async_context(
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://api",
                timeout=60,
                headers=admin_headers(settings),
            )
        )
        control = await stack.enter_async_context(
            httpx.AsyncClient(base_url=sandbox.url, timeout=10)
        )
        log_dir = tmp_path / "logs"
        log_dir.mkdir()
        yield Pipeline(
            database_url=database_url,
            catalog=template.catalog,
            redis_server=redis_server,
            sandbox=sandbox,
            api=api,
            control=control,
            pg=pg,
            redis=redis,
            log_dir=log_dir,
            workers=workers,
        )


def admin_headers(settings: Settings) -> dict[str, str]:
    """The back office calls the API as ADMIN (anonymous callers see no orders or jobs)."""
    secret = settings.access.token_secret(settings.production)
    return {"Authorization": f"Bearer {mint_token(secret, Role.ADMIN)}"}


async def relay_until_drained(p: Pipeline) -> None:
    """Run the real relay (in-process) until the outbox has nothing unpublished."""
    db = Database.connect(DatabaseSettings(url=p.database_url, replica_url=None, pool_size=2))
    stop = asyncio.Event()
    task = asyncio.create_task(Relay(db, p.redis, JobSettings()).run(stop))
    try:

        async def drained() -> bool:
            assert not task.done(), task
            return await p.unpublished() == 0

        await p.eventually(drained, "the relay to publish the outbox", limit_s=15)
    finally:
        stop.set()
        await task
        await db.dispose()


async def _equal(value: Awaitable[object], expected: object) -> bool:
    return await value == expected


def assert_commit_order(events: list[Json], final: dict[int, tuple[int, int]]) -> None:
    """Per stock level, every event continues where the previous one left off (on_hand and
    reserved after = before + delta, starting from the set-up's stock), and the last one is
    the level as it is now: the stream shows each level's changes in commit order, none lost."""
    by_level: dict[int, list[Json]] = defaultdict(list)
    for event in events:
        by_level[event["stock_level_id"]].append(event)
    for level, sequence in by_level.items():
        on_hand, reserved = STOCK_PER_LEVEL, 0
        for event in sequence:
            assert event["on_hand"] == on_hand + event["on_hand_delta"], (level, event)
            assert event["reserved"] == reserved + event["reserved_delta"], (level, event)
            on_hand, reserved = event["on_hand"], event["reserved"]
        assert (on_hand, reserved) == final[level], level


async def levels_now(p: Pipeline) -> dict[int, tuple[int, int]]:
    rows = await p.pg.fetch("SELECT id, on_hand, reserved FROM stock_levels")
    return {r["id"]: (r["on_hand"], r["reserved"]) for r in rows}


async def stock_outbox_ids(p: Pipeline) -> list[int]:
    rows = await p.pg.fetch("SELECT id FROM outbox WHERE topic = 'stock.changed' ORDER BY id")
    return [r["id"] for r in rows]


# ---------------------------------------------------------------- 1. the happy path (+ 9. /metrics)


async def test_placed_and_cancelled_order_reach_each_partner_once_and_show_in_metrics(
    pipeline: Pipeline,
) -> None:
    p = pipeline
    a, b = p.catalog.products[:2]
    port = free_port()
    p.start("worker", "--concurrency", "8", "--metrics-port", str(port))
    order = await p.place_order([(a, 2), (b, 3)], customer=1)

    # INVOICE + NOTIFICATION + one SHOP_SYNC of the order's products
    await p.wait_all_succeeded(3)
    jobs = await p.integrations(order)
    assert sorted((j["kind"], j["status"], j["attempts"], j["lastError"]) for j in jobs) == [
        ("INVOICE", "SUCCEEDED", 1, None),
        ("NOTIFICATION", "SUCCEEDED", 1, None),
        ("SHOP_SYNC", "SUCCEEDED", 1, None),
    ]
    effects = await p.effects()
    assert effects["counts"] == {"invoices": 1, "notifications": 1, "availability_pushes": 2}
    invoice = effects["invoices"][order.invoice_key]
    by_kind = {j["kind"]: j for j in jobs}
    assert by_kind["INVOICE"]["externalRef"] == invoice["invoice_number"]
    message = effects["notifications"][order.notify_key]
    assert by_kind["NOTIFICATION"]["externalRef"] == message["message_id"]

    # what the partner got is the order as the database has it
    row = await p.pg.fetchrow(
        "SELECT o.number, o.total::text AS total, o.currency, c.email FROM orders o"
        " JOIN customers c ON c.id = o.customer_id WHERE o.id = $1",
        order.pk,
    )
    assert (invoice["order_id"], invoice["order_number"]) == (order.pk, order.number)
    assert (invoice["total"], invoice["currency"]) == (row["total"], row["currency"])
    assert invoice["customer_email"] == row["email"] == message["recipient"]
    assert [(line["sku"], line["quantity"]) for line in invoice["lines"]] == [
        (p.catalog.skus[a], 2),
        (p.catalog.skus[b], 3),
    ]
    assert message["template"] == "order-placed"
    assert message["data"]["order_number"] == order.number
    # the shop shows what is left to sell across the three warehouses, from one push
    assert effects["availability"] == {
        p.catalog.skus[a]: 3 * STOCK_PER_LEVEL - 2,
        p.catalog.skus[b]: 3 * STOCK_PER_LEVEL - 3,
    }
    shop_calls = [c for c in await p.calls() if c["partner"] == "shop"]
    assert [len(c["body"]["items"]) for c in shop_calls] == [2]
    [sync] = [j for j in await p.jobs() if j["kind"] == "SHOP_SYNC"]
    assert shop_calls[0]["idempotency_key"].startswith(sync["key"] + ":")
    await p.assert_each_effect_once([order])

    # cancelled: one more NOTIFICATION and one SHOP_SYNC for all of the order's products
    body = await gql(p.api, CANCEL, {"input": {"orderId": order.id, "reason": "changed mind"}})
    assert body["data"]["cancelOrder"]["errors"] == []
    await p.wait_all_succeeded(5)
    kinds = Counter(j["kind"] for j in await p.integrations(order))
    assert kinds == Counter({"INVOICE": 1, "NOTIFICATION": 2, "SHOP_SYNC": 2})
    effects = await p.effects()
    assert effects["counts"] == {"invoices": 1, "notifications": 2, "availability_pushes": 4}
    cancelled = effects["notifications"][f"notify:order-cancelled:{order.pk}"]
    assert (cancelled["template"], cancelled["data"]["reason"]) == (
        "order-cancelled",
        "changed mind",
    )
    assert effects["availability"] == {  # the reservations are released
        p.catalog.skus[a]: 3 * STOCK_PER_LEVEL,
        p.catalog.skus[b]: 3 * STOCK_PER_LEVEL,
    }

    # 9. the worker's /metrics (pipeline figures refresh every 5 s: wait for a fresh one)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:

        async def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            try:
                text = (await http.get("/metrics")).text
            except httpx.HTTPError:
                return None
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }
            key = ("qm_integration_jobs", (("kind", "SHOP_SYNC"), ("status", "SUCCEEDED")))
            return samples if samples.get(key) == 2 else None

        samples = await p.eventually(scrape, "/metrics to show the finished jobs", limit_s=15)

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    for kind, n in (("INVOICE", 1), ("NOTIFICATION", 2), ("SHOP_SYNC", 2)):
        assert value("qm_integration_jobs", kind=kind, status="SUCCEEDED") == n
        assert value("qm_jobs_processed_total", kind=kind, outcome="succeeded") == n
    for stream in JOB_STREAMS.values():
        assert value("qm_stream_pending", stream=stream, group=WORKER_GROUP) == 0
        assert value("qm_stream_lag", stream=stream, group=WORKER_GROUP) == 0
    for partner, calls in (("invoicing", 1), ("notifications", 2), ("shop", 2)):  # a push a job
        assert value("qm_partner_request_seconds_count", partner=partner, outcome="ok") == calls
        assert value("qm_partner_breaker_state", partner=partner) == BreakerState.CLOSED
    assert value("qm_outbox_unpublished") == 0
    assert value("qm_relay_published_total") == 6  # placed, cancelled, 2 + 2 stock changes
    # every one of the 5 jobs read its row through the shared statements, some together
    assert value("qm_worker_batch_items_total", batch="jobs") == 5
    assert 1 <= value("qm_worker_batch_flushes_total", batch="jobs") <= 5
    assert value("qm_worker_batch_items_total", batch="succeeded") == 5


# ---------------------------------------------------------------- 2. Redis outage


async def test_orders_placed_while_redis_is_down_are_delivered_once_after_restart(
    pipeline: Pipeline,
) -> None:
    p = pipeline
    products = p.catalog.products[:4]
    worker = p.start("worker", "--concurrency", "16")
    first = await p.place_order([(products[0], 1)])
    await p.wait_all_succeeded(3)

    p.redis_server.kill()  # SIGKILL, and no persistence: whatever was in Redis is gone
    orders = await p.place_orders(200, lambda i: [(products[i % 4], 1 + i % 3)], concurrency=20)
    assert len({o.pk for o in orders}) == 200  # every mutation succeeded (place_order checks)
    # nothing could reach Redis: all 400 events of the 200 orders wait in the outbox
    assert await p.unpublished() == 2 * 200
    assert worker.alive()

    p.redis_server.start()  # same port, empty: no streams, no consumer groups
    await p.wait_all_succeeded(3 * 201, limit_s=60)
    await p.assert_each_effect_once([first, *orders])
    effects = await p.effects()
    assert effects["counts"]["availability_pushes"] == 201
    available = {
        p.catalog.skus[r["product_id"]]: r["available"]
        for r in await p.pg.fetch(
            "SELECT product_id, sum(on_hand - reserved)::int AS available FROM stock_levels"
            " WHERE product_id = ANY($1::bigint[]) GROUP BY product_id",
            products,
        )
    }
    assert effects["availability"] == available
    assert worker.alive()


# ---------------------------------------------------------------- 3. SIGKILL of a worker


async def test_worker_killed_mid_batch_its_jobs_are_taken_over(pipeline: Pipeline) -> None:
    p = pipeline
    await p.configure(partner="*", latency_ms=300)  # jobs spend their time in flight
    products = p.catalog.products
    orders = await p.place_orders(45, lambda i: [(products[i % 6], 1)])
    a = p.start("worker", "--concurrency", "8")
    b = p.start("worker", "--concurrency", "8")
    await p.started(a, b)

    async def a_is_busy() -> bool:
        done = (await p.statuses())["SUCCEEDED"]
        return done >= 15 and len(await p.pending_of(a.consumer)) >= 4

    await p.eventually(a_is_busy, "worker A to have jobs in flight")
    a.kill()
    orphaned = await p.pending_of(a.consumer)  # delivered to A, never acknowledged
    assert orphaned, "A died with nothing in flight"

    await p.wait_all_succeeded(3 * 45, limit_s=45)
    claimed = {f"{e['stream']}/{e['entry']}" for e in b.events("worker.claimed")}
    assert set(orphaned) <= claimed, (orphaned, claimed)
    await p.eventually(
        lambda: _equal(p.group_pending(), 0), "every stream entry to be acknowledged", limit_s=10
    )
    await p.assert_each_effect_once(orders)
    # no attempt was lost or counted twice: A never recorded the ones it died with
    await p.assert_attempts_counted_once()


# ---------------------------------------------------------------- 4. retries and backoff


async def test_partner_errors_are_retried_with_growing_delays_and_retry_after(
    pipeline: Pipeline,
) -> None:
    p = pipeline
    order = await p.place_order([(p.catalog.products[0], 1)])
    await p.configure(partner="invoicing", fail_next=5)  # five 503s, then healthy
    await p.configure(partner="notifications", fail_next=1, error_status=429, retry_after_s=2)
    p.start("worker")
    await p.wait_all_succeeded(3, limit_s=40)

    invoice_calls = await p.calls(order.invoice_key)
    assert [c["status"] for c in invoice_calls] == [503] * 5 + [201]
    at = [c["at"] for c in invoice_calls]
    gaps = [later - earlier for earlier, later in itertools.pairwise(at)]
    # attempt n waits between d/2 and d, d = 0.2 s · 2^(n-1) (QM_JOB_BACKOFF_BASE_S=0.2)
    for attempt, gap in enumerate(gaps, start=1):
        ceiling = 0.2 * 2 ** (attempt - 1)
        assert ceiling / 2 - 0.02 <= gap <= ceiling + 1.5, (attempt, gaps)
    assert gaps[0] < gaps[2] < gaps[4], gaps
    for earlier, later in itertools.pairwise(gaps):
        assert later > earlier - 0.25, gaps  # growing, up to the scheduler's 0.1 s tick

    notify_calls = await p.calls(order.notify_key)
    assert [c["status"] for c in notify_calls] == [429, 202]
    waited = notify_calls[1]["at"] - notify_calls[0]["at"]
    assert 2.0 <= waited < 4.0, waited  # Retry-After: 2 beats the 0.1-0.2 s backoff

    jobs = {j["kind"]: j for j in await p.integrations(order)}
    assert (jobs["INVOICE"]["status"], jobs["INVOICE"]["attempts"]) == ("SUCCEEDED", 6)
    assert jobs["INVOICE"]["lastError"] is None
    assert (
        jobs["INVOICE"]["externalRef"]
        == (await p.effects())["invoices"][order.invoice_key]["invoice_number"]
    )
    assert (jobs["NOTIFICATION"]["status"], jobs["NOTIFICATION"]["attempts"]) == ("SUCCEEDED", 2)
    await p.assert_each_effect_once([order])


# ---------------------------------------------------------------- 5. poison job, dead letter


async def test_poison_job_goes_dead_others_go_on_and_retry_revives_it(pipeline: Pipeline) -> None:
    p = pipeline
    products = p.catalog.products
    orders = await p.place_orders(4, lambda i: [(products[i], 1)], concurrency=1)
    poisoned = orders[1]
    await p.configure(partner="invoicing", poison_keys=[poisoned.invoice_key])
    # the default breaker threshold (5): one poisoned job must not trip it for the others
    p.start("worker", QM_JOB_MAX_ATTEMPTS=3, QM_BREAKER_THRESHOLD=5)

    async def settled(expected: int) -> bool:
        return await p.statuses() == Counter({"SUCCEEDED": expected - 1, "DEAD": 1})

    await p.eventually(lambda: settled(12), "11 jobs to succeed and the poisoned one to die")
    dead = await p.job(poisoned.invoice_key)
    assert (dead["status"], dead["attempts"]) == ("DEAD", 3)
    assert "503" in dead["last_error"], dead["last_error"]
    assert [c["status"] for c in await p.calls(poisoned.invoice_key)] == [503, 503, 503]
    letters = await p.redis.xrange(DEAD_LETTER_STREAM)
    assert [(int(f[b"job_id"]), f[b"key"].decode()) for _, f in letters] == [
        (dead["id"], poisoned.invoice_key)
    ]
    assert b"503" in letters[0][1][b"error"]
    effects = await p.effects()
    assert set(effects["invoices"]) == {o.invoice_key for o in orders if o != poisoned}
    assert effects["counts"]["notifications"] == 4

    shown = {j["kind"]: j for j in await p.integrations(poisoned)}["INVOICE"]
    assert (shown["status"], shown["attempts"], shown["externalRef"]) == ("DEAD", 3, None)
    assert "503" in shown["lastError"]

    # the partner is not blocked: an order placed now is invoiced at once
    late = await p.place_order([(products[5], 1)])
    await p.eventually(lambda: settled(15), "the late order's jobs to succeed")

    # the key is fixed at the partner; a person retries the job
    await p.configure(partner="invoicing", poison_keys=[])
    body = await gql(p.api, RETRY, {"input": {"jobId": shown["id"]}})
    payload = body["data"]["retryIntegrationJob"]
    assert payload["errors"] == [], payload
    assert (payload["job"]["status"], payload["job"]["attempts"]) == ("PENDING", 0)
    await p.wait_all_succeeded(15)
    revived = {j["kind"]: j for j in await p.integrations(poisoned)}["INVOICE"]
    effects = await p.effects()
    assert (revived["status"], revived["attempts"]) == ("SUCCEEDED", 1)
    assert revived["externalRef"] == effects["invoices"][poisoned.invoice_key]["invoice_number"]
    await p.assert_each_effect_once([*orders, late])
    assert len(await p.redis.xrange(DEAD_LETTER_STREAM)) == 1  # nothing died again

    # only FAILED or DEAD jobs can be retried; unknown ids are NOT_FOUND
    body = await gql(p.api, RETRY, {"input": {"jobId": revived["id"]}})
    refused = body["data"]["retryIntegrationJob"]
    assert refused["job"] is None
    assert [(e["code"], e["field"]) for e in refused["errors"]] == [("INVALID_STATE", ["jobId"])]
    body = await gql(p.api, RETRY, {"input": {"jobId": encode_id("IntegrationJob", 10**12)}})
    missing = body["data"]["retryIntegrationJob"]
    assert [(e["code"], e["field"]) for e in missing["errors"]] == [("NOT_FOUND", ["jobId"])]


# ---------------------------------------------------------------- 6. relay crash after XADD


async def test_relay_dying_between_xadd_and_mark_published_duplicates_entries_not_effects(
    pipeline: Pipeline,
) -> None:
    p = pipeline
    products = p.catalog.products
    orders = await p.place_orders(2, lambda i: [(products[i], 1)], concurrency=1)

    # the relay's steps 1 and 2, then it "dies": the rows are never marked published
    db = Database.connect(DatabaseSettings(url=p.database_url, replica_url=None, pool_size=2))
    settings = JobSettings()
    try:
        conn = await db.primary.connect()
        try:
            # wait until both orders' rows are claimable (committed)
            deadline = time.monotonic() + 15
            while len(rows := await repo.claim_outbox_batch(conn, settings.relay_batch)) < 4:
                await conn.rollback()
                assert time.monotonic() < deadline, f"only {len(rows)} rows claimable"
                await asyncio.sleep(0.05)
            jobs = await repo.upsert_jobs(conn, [s.as_row() for s in jobs_for_events(rows)])
            await conn.commit()
            await publish(p.redis, rows, jobs, settings, statuses=(IntegrationStatus.PENDING,))
        finally:
            await conn.close()
    finally:
        await db.dispose()
    assert len(rows) == 4 and len(jobs) == 6  # 2 × (order.placed + stock.changed)
    assert await p.unpublished() == 4

    # the next relay round publishes the same rows again
    await relay_until_drained(p)
    job_ids = {r["id"]: r["kind"] for r in await p.jobs()}
    assert len(job_ids) == 6  # the repeat found the jobs, it made no new ones
    for kind, stream in ((k.value, s) for k, s in JOB_STREAMS.items()):
        entries = Counter(await p.stream_job_ids(stream))
        assert entries == Counter({j: 2 for j, k in job_ids.items() if k == kind}), stream
    stock = Counter(e["outbox_id"] for e in await p.stock_events())
    assert stock == Counter({i: 2 for i in await stock_outbox_ids(p)})

    # workers read every entry twice and still bill, notify and sync once
    p.start("worker")
    await p.wait_all_succeeded(6)
    await p.eventually(lambda: _equal(p.group_pending(), 0), "both copies to be acknowledged")
    for stream in JOB_STREAMS.values():
        group = (await p.redis.xinfo_groups(stream))[0]
        last = (await p.redis.xrevrange(stream, count=1))[0][0]
        assert group["last-delivered-id"] == last, stream  # the duplicates were read too
    await p.assert_each_effect_once(orders)
    assert (await p.effects())["counts"]["availability_pushes"] == 2
    await p.assert_attempts_counted_once()  # a duplicate entry is not another attempt
    assert await p.redis.xlen(DEAD_LETTER_STREAM) == 0


# ---------------------------------------------------------------- 7. outbox replay


async def test_outbox_replay_after_redis_lost_its_data(pipeline: Pipeline) -> None:
    """After a FLUSHALL, ``outbox replay --since T`` republishes the events since T and enqueues
    the unfinished jobs again — including one put back by ``retryIntegrationJob`` whose order is
    older than T — but not the finished ones; the workers then complete each job once."""
    p = pipeline
    products = p.catalog.products
    old = await p.place_order([(products[0], 1)])  # before T; its invoice is going to die
    await p.configure(partner="invoicing", poison_keys=[old.invoice_key])
    worker = p.start("worker", QM_JOB_MAX_ATTEMPTS=1)

    async def old_invoice_dead() -> bool:
        return await p.statuses() == Counter({"SUCCEEDED": 2, "DEAD": 1})

    await p.eventually(old_invoice_dead, "the old order's invoice to die")
    since = await p.pg.fetchval("SELECT date_trunc('second', now())")  # the CLI takes seconds
    await asyncio.sleep(1.05 - since.microsecond / 1e6)  # T is strictly after `old`
    since = await p.pg.fetchval("SELECT date_trunc('second', now())")
    done = await p.place_order([(products[1], 1)])  # after T, finished before the loss
    await p.eventually(
        lambda: _equal(p.statuses(), Counter({"SUCCEEDED": 5, "DEAD": 1})), "`done` to succeed"
    )
    assert await worker.terminate() == 0

    # with the workers stopped: a person retries the dead invoice, more orders come in, the
    # relay publishes all of it, and then Redis loses everything
    await p.configure(partner="invoicing", poison_keys=[])
    dead = await p.job(old.invoice_key)
    body = await gql(p.api, RETRY, {"input": {"jobId": encode_id("IntegrationJob", dead["id"])}})
    assert body["data"]["retryIntegrationJob"]["errors"] == []
    waiting = await p.place_orders(3, lambda i: [(products[2 + i], 1)], concurrency=1)
    await relay_until_drained(p)
    assert sorted(await p.stream_job_ids(INVOICES)) == sorted(
        [dead["id"], *[(await p.job(o.invoice_key))["id"] for o in waiting]]
    )
    await p.redis.flushall()

    replay = p.start("outbox", "replay", "--since", since.strftime("%Y-%m-%dT%H:%M:%S%z"))
    assert await replay.wait(30) == 0, replay.text()
    match = re.search(r"replayed (\d+) outbox events since .*; (\d+) jobs enqueued", replay.text())
    assert match, replay.text()
    # events since T: 4 orders × (placed + stock) + the retry; jobs: the 9 of the waiting
    # orders and the retried invoice, not the 3 finished ones of `done`
    assert (int(match[1]), int(match[2])) == (9, 10)
    unfinished = {r["id"] for r in await p.jobs() if r["status"] == "PENDING"}
    assert len(unfinished) == 10 and dead["id"] in unfinished
    enqueued = [j for s in JOB_STREAMS.values() for j in await p.stream_job_ids(s)]
    assert sorted(enqueued) == sorted(unfinished)
    events = await p.stock_events()
    stock_since = await p.pg.fetch(
        "SELECT id FROM outbox WHERE topic = 'stock.changed' AND created_at >= $1 ORDER BY id",
        since,
    )
    assert [e["outbox_id"] for e in events] == [r["id"] for r in stock_since]  # in order
    assert len(events) == 4
    assert_commit_order(events, await levels_now(p))

    p.start("worker")
    await p.wait_all_succeeded(15)
    await p.assert_each_effect_once([old, done, *waiting])
    for key in (done.invoice_key, done.notify_key, old.notify_key):
        assert len(await p.calls(key)) == 1  # finished work was not sent again


# ---------------------------------------------------------------- 8. several relays


async def test_several_relays_publish_each_event_once_in_commit_order(pipeline: Pipeline) -> None:
    p = pipeline
    shared, *others = p.catalog.products[:4]
    # two workers, each with its relay (and consumers): the relays race for the leader lock
    relays = [p.start("worker"), p.start("worker")]
    await p.started(*relays)

    def leaders() -> list[int]:
        return [i for i, r in enumerate(relays) if r.events("relay.leader")]

    # every order reserves the shared product, so its levels change in many transactions
    batch = await p.place_orders(30, lambda i: [(shared, 1 + i % 4), (others[i % 3], 2)], 10)
    await p.wait_all_succeeded(30 * 3)  # invoice, notification, one shop sync per order
    assert len(leaders()) == 1, "exactly one relay leads while both are alive"

    # the leader crashes; the standby takes the lock and carries on
    leader = relays[leaders()[0]]
    leader.kill()
    more = await p.place_orders(20, lambda i: [(shared, 1), (others[i % 3], 1)], 10)
    await p.wait_all_succeeded(50 * 3, limit_s=30)
    assert len(leaders()) == 2, "the standby took over"

    enqueued = Counter[int]()
    for stream in JOB_STREAMS.values():
        enqueued.update(await p.stream_job_ids(stream))
    assert enqueued == Counter({r["id"]: 1 for r in await p.jobs()})  # each job exactly once
    events = await p.stock_events()
    published = [e["outbox_id"] for e in events]
    # once each; the stream follows commit order, which is not id order: a transaction that drew
    # its outbox ids first may commit after one that drew later ids (see migration 0002)
    assert sorted(published) == await stock_outbox_ids(p)
    assert len(set(published)) == len(published)
    assert_commit_order(events, await levels_now(p))
    await p.assert_each_effect_once([*batch, *more])


async def test_shop_sync_retried_after_a_lost_answer_pushes_the_new_figure(
    pipeline: Pipeline,
) -> None:
    """The shop applied a push whose answer never arrived (client timeout) and stock changed
    before the retry. The retry must push the current figure and succeed, not reuse the
    idempotency key with a different body (an idempotent partner answers 409) and go DEAD."""
    p = pipeline
    product = p.catalog.products[0]
    sku = p.catalog.skus[product]
    await p.configure(partner="shop", latency_ms=1200)  # answers after the client gave up
    first = await p.place_order([(product, 1)])
    p.start("worker", QM_PARTNER_TIMEOUT_S=0.5, QM_JOB_BACKOFF_BASE_S=2.5)
    key = f"shop-sync:order:{first.pk}:RESERVATION"

    async def timed_out() -> bool:
        job = await p.job(key) if await p.unpublished() == 0 else None
        return job is not None and job["status"] == "FAILED"

    await p.eventually(timed_out, "the first push to time out at the client")
    assert "timed out" in (await p.job(key))["last_error"]
    await p.configure(partner="shop", latency_ms=0)
    await p.place_order([(product, 5)])  # the figure the retry reads is now different

    async def settled() -> bool:
        counts = await p.statuses()
        return sum(counts.values()) == 6 and counts["PENDING"] + counts["FAILED"] == 0

    await p.eventually(settled, "every job to finish", limit_s=20)
    job = await p.job(key)
    assert (job["status"], job["attempts"], job["last_error"]) == ("SUCCEEDED", 2, None)
    assert await p.redis.xlen(DEAD_LETTER_STREAM) == 0
    assert (await p.effects())["availability"][sku] == 3 * STOCK_PER_LEVEL - 6


# ---------------------------------------------------------------- 10. units and shutdown


def test_backoff_grows_within_bounds() -> None:
    rng = random.Random(4)
    base, cap = 0.5, 30.0
    previous_max = 0.0
    for attempt in range(1, 13):
        ceiling = min(cap, base * 2 ** (attempt - 1))
        delays = [backoff_delay(attempt, base, cap, rng) for _ in range(300)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), attempt
        assert min(delays) >= min(previous_max, cap / 2)  # never shorter than the last one
        assert max(delays) - min(delays) > ceiling / 4  # jitter spreads retries out
        previous_max = max(delays)
    assert backoff_delay(0, base, cap, rng) <= base  # attempt 0 is treated as the first
    assert all(backoff_delay(60, base, cap, rng) <= cap for _ in range(100))  # no overflow


def test_circuit_breaker_opens_probes_once_and_closes_or_reopens() -> None:
    now = [1000.0]
    breaker = CircuitBreaker("invoicing", threshold=3, cooldown_s=10, clock=lambda: now[0])
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    breaker.failure()
    breaker.failure()
    breaker.success()  # a success in between: failures must be consecutive
    breaker.failure()
    breaker.failure()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    breaker.failure()  # the third in a row
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.wait_s() == pytest.approx(10)
    now[0] += 6
    assert not breaker.allow() and breaker.wait_s() == pytest.approx(4)

    now[0] += 4  # cooldown over: exactly one probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()
    assert not breaker.allow() and not breaker.allow()
    assert 0 < breaker.wait_s() <= 10  # the others come back later, they do not spin
    breaker.failure()  # the probe failed: open again for a whole cooldown
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    now[0] += 9.9
    assert not breaker.allow()
    now[0] += 0.1
    assert breaker.allow()  # the next probe
    breaker.release_probe()  # ended without a verdict (a local error): another may probe
    assert breaker.allow()
    assert not breaker.allow()
    breaker.success()  # the probe succeeded
    assert breaker.state is BreakerState.CLOSED
    assert all(breaker.allow() for _ in range(10))
    assert breaker.wait_s() == 0


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


async def test_trim_acknowledged_never_removes_a_pending_entry(own_redis: RedisServer) -> None:
    redis = Redis.from_url(own_redis.url)
    stream = "qm:jobs:invoice"
    try:
        ids = [await redis.xadd(stream, {"job_id": i}) for i in range(10)]
        await redis.xgroup_create(stream, "g1", id="0")
        read = await redis.xreadgroup("g1", "c1", {stream: ">"}, count=6)
        assert [entry_id for entry_id, _ in read[0][1]] == ids[:6]
        await redis.xack(stream, "g1", ids[0], ids[1], ids[3])  # 2, 4 and 5 stay pending

        await trim_acknowledged(redis, stream)
        remaining = [entry_id for entry_id, _ in await redis.xrange(stream)]
        assert remaining == ids[2:]  # only what lies before the oldest pending entry
        pending = await redis.xpending_range(stream, "g1", min="-", max="+", count=10)
        assert [r["message_id"] for r in pending] == [ids[2], ids[4], ids[5]]
        # the pending entries can still be claimed with their fields (a crashed worker's)
        claimed = await redis.xclaim(stream, "g1", "c2", 0, [ids[2], ids[4], ids[5]])
        assert [int(fields[b"job_id"]) for _, fields in claimed] == [2, 4, 5]

        await redis.xack(stream, "g1", ids[2], ids[4], ids[5])
        await trim_acknowledged(redis, stream)
        # everything read and acknowledged is gone, nothing unread was touched
        assert [e for e, _ in await redis.xrange(stream)] == ids[6:]

        # a second group that has read less holds the floor back
        await redis.xgroup_create(stream, "g2", id="0")
        await redis.xreadgroup("g2", "c1", {stream: ">"}, count=1)  # ids[6], left pending
        await redis.xreadgroup("g1", "c1", {stream: ">"})
        await redis.xack(stream, "g1", *ids[6:])
        await trim_acknowledged(redis, stream)
        assert [e for e, _ in await redis.xrange(stream)] == ids[6:]
        await redis.xack(stream, "g2", ids[6])
        await trim_acknowledged(redis, stream)
        assert [e for e, _ in await redis.xrange(stream)] == ids[7:]  # unread by g2: kept
        await trim_acknowledged(redis, "qm:no-such-stream")  # nothing to trim, no error
    finally:
        await redis.aclose()


async def test_sigterm_finishes_short_jobs_and_hands_back_long_ones(pipeline: Pipeline) -> None:
    p = pipeline
    await p.configure(partner="invoicing", latency_ms=600)  # finishes within the grace period
    await p.configure(partner="notifications", latency_ms=4000)  # does not
    orders = await p.place_orders(3, lambda i: [(p.catalog.products[i], 1)], concurrency=1)
    a = p.start("worker", QM_WORKER_SHUTDOWN_GRACE_S=1.5, QM_JOB_CLAIM_IDLE_S=60)

    async def all_in_flight() -> bool:
        pending = await p.pending_of(a.consumer)
        invoices = [e for e in pending if e.startswith(f"{INVOICES}/")]
        notifications = [e for e in pending if e.startswith(f"{NOTIFICATIONS}/")]
        return len(invoices) == 3 and len(notifications) == 3

    await p.eventually(all_in_flight, "the worker to hold the invoices and notifications")
    sent = time.monotonic()
    assert await a.terminate(20) == 0, a.tail()
    assert time.monotonic() - sent < 1.5 + 3.0, "the worker did not stop after its grace period"

    for order in orders:
        invoice = await p.job(order.invoice_key)
        assert (invoice["status"], invoice["attempts"]) == ("SUCCEEDED", 1)
        note = await p.job(order.notify_key)  # handed back: not an attempt, not a failure
        assert (note["status"], note["attempts"], note["last_error"]) == ("PENDING", 0, None)
    handed_back = a.events("worker.handed_back")
    assert sorted(e["stream"] for e in handed_back) == [NOTIFICATIONS] * 3
    assert await p.group_pending() == 0  # acknowledged after being put back on the stream
    notes = {(await p.job(o.notify_key))["id"] for o in orders}
    assert Counter(await p.stream_job_ids(NOTIFICATIONS)) == Counter({n: 2 for n in notes})

    # the next worker sends them; the partner still shows one message per order
    await p.configure(partner="notifications", latency_ms=0)
    p.start("worker", QM_JOB_CLAIM_IDLE_S=60)
    await p.wait_all_succeeded(9)
    await p.assert_each_effect_once(orders)

"""The worker's micro-batching: ``Batcher`` on its own, and ``JobStore`` against the real
PostgreSQL and Redis of the test session (many jobs' reads and writes, one statement each)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from quartermaster.config import DatabaseSettings
from quartermaster.db.engine import Database
from quartermaster.enums import IntegrationStatus
from quartermaster.streams import WORKER_GROUP
from quartermaster.workers.batching import Batcher
from quartermaster.workers.store import JobStore

# ---------------------------------------------------------------- Batcher


class Recorder:
    def __init__(self, fail_on: int | None = None) -> None:
        self.calls: list[list[int]] = []
        self.fail_on = fail_on

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        await asyncio.sleep(0)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError(f"cannot handle {self.fail_on}")
        return [i * 10 for i in items]


async def test_items_submitted_in_one_loop_turn_share_one_flush() -> None:
    flush = Recorder()
    batcher: Batcher[int, int] = Batcher(flush)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(5)))
    assert results == [0, 10, 20, 30, 40]
    assert flush.calls == [[0, 1, 2, 3, 4]]
    # a later submission is a new batch
    assert await batcher.submit(7) == 70
    assert flush.calls[-1] == [7]
    assert (batcher.flushes, batcher.items) == (2, 6)


async def test_a_window_collects_items_that_arrive_a_little_later() -> None:
    flush = Recorder()
    batcher: Batcher[int, int] = Batcher(flush, window_s=0.05)

    async def later(i: int, delay: float) -> int:
        await asyncio.sleep(delay)
        return await batcher.submit(i)

    results = await asyncio.gather(later(1, 0), later(2, 0.01), later(3, 0.02), later(4, 0.2))
    assert results == [10, 20, 30, 40]
    assert flush.calls == [[1, 2, 3], [4]]


async def test_max_size_splits_batches() -> None:
    flush = Recorder()
    batcher: Batcher[int, int] = Batcher(flush, max_size=2)
    assert await asyncio.gather(*(batcher.submit(i) for i in range(5))) == [0, 10, 20, 30, 40]
    assert flush.calls == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        Batcher(flush, max_size=0)


async def test_a_failing_flush_fails_its_own_batch_only() -> None:
    flush = Recorder(fail_on=2)
    batcher: Batcher[int, int] = Batcher(flush, max_size=2)
    outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
    assert outcomes[:2] == [0, 10]
    assert [type(o) for o in outcomes[2:]] == [RuntimeError, RuntimeError]
    assert "cannot handle 2" in str(outcomes[2])
    assert await batcher.submit(5) == 50  # the batcher goes on after a failure


async def test_a_flush_with_the_wrong_number_of_results_is_an_error() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    batcher: Batcher[int, int] = Batcher(short)
    outcomes = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)


async def test_a_cancelled_caller_does_not_break_the_batch() -> None:
    flush = Recorder()
    batcher: Batcher[int, int] = Batcher(flush, window_s=0.05)
    first = asyncio.ensure_future(batcher.submit(1))
    second = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0)
    first.cancel()
    assert await second == 20
    assert flush.calls == [[1, 2]]


async def test_aclose_flushes_what_waits_and_gives_up_on_a_hung_flush() -> None:
    flush = Recorder()
    batcher: Batcher[int, int] = Batcher(flush, window_s=60)  # would wait a minute
    waiting = batcher.submit(3)
    await batcher.aclose()
    assert await waiting == 30 and flush.calls == [[3]]

    async def hangs(items: list[int]) -> list[int]:
        await asyncio.sleep(3600)
        return items

    stuck: Batcher[int, int] = Batcher(hangs)
    caller = stuck.submit(1)
    await asyncio.sleep(0.01)  # the flush is under way
    started = asyncio.get_running_loop().time()
    await stuck.aclose(timeout_s=0.1)
    assert asyncio.get_running_loop().time() - started < 2
    assert caller.cancelled()


# ---------------------------------------------------------------- JobStore


@pytest_asyncio.fixture
async def store(database_url: str, redis_url: str) -> AsyncIterator[JobStore]:
    db = Database.connect(DatabaseSettings(url=database_url, replica_url=None, pool_size=2))
    redis = Redis.from_url(redis_url)
    job_store = JobStore(db, redis)
    try:
        yield job_store
    finally:
        await job_store.aclose()
        await redis.aclose()
        await db.dispose()


@pytest_asyncio.fixture
async def jobs(db: asyncpg.Pool) -> AsyncIterator[list[dict[str, Any]]]:
    """Six jobs of the seed's first orders (INVOICE and SHOP_SYNC of an order, SHOP_SYNC of
    a product); deleted again afterwards (the seed has none)."""
    orders = await db.fetch("SELECT id FROM orders ORDER BY id LIMIT 3")
    product = await db.fetchval("SELECT min(id) FROM products")
    rows = []
    for o in orders:
        for kind in ("INVOICE", "SHOP_SYNC"):
            rows.append((kind, o["id"], None, f"batching-test:{kind}:{o['id']}"))
    rows.append(("SHOP_SYNC", None, product, f"batching-test:product:{product}"))
    created = await db.fetch(
        "INSERT INTO integration_jobs (kind, status, order_id, product_id, idempotency_key,"
        " attempts) SELECT k, 'PENDING', o, p, key, 0"
        " FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[]) AS t(k, o, p, key)"
        " RETURNING id, kind, order_id, product_id",
        [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows],
    )  # fmt: skip
    try:
        yield [dict(r) for r in created]
    finally:
        await db.execute(
            "DELETE FROM integration_jobs WHERE idempotency_key LIKE 'batching-test:%'"
        )


async def test_job_rows_of_many_jobs_are_one_read(
    store: JobStore, jobs: list[dict[str, Any]]
) -> None:
    ids = [j["id"] for j in jobs]
    rows = await asyncio.gather(*(store.job(i) for i in [*ids, 10**12, ids[0]]))
    assert [r.id for r in rows[: len(ids)]] == ids
    assert rows[len(ids)] is None  # an unknown id
    assert rows[-1].id == ids[0]  # asked twice in one batch
    assert all(r.status == IntegrationStatus.PENDING for r in rows if r is not None)
    assert (store.batchers["jobs"].flushes, store.batchers["jobs"].items) == (1, len(ids) + 2)


async def test_invoice_data_and_availability_match_the_database(
    store: JobStore, jobs: list[dict[str, Any]], db: asyncpg.Pool
) -> None:
    order_ids = sorted({j["order_id"] for j in jobs if j["order_id"] is not None})
    invoices = await asyncio.gather(*(store.invoice_data(o) for o in [*order_ids, 10**12]))
    assert invoices[-1] is None
    for order_id, data in zip(order_ids, invoices, strict=False):
        assert data is not None
        expected = await db.fetchrow(
            "SELECT o.number, o.total, c.email FROM orders o JOIN customers c"
            " ON c.id = o.customer_id WHERE o.id = $1",
            order_id,
        )
        assert (data.order.number, data.order.total, data.order.email) == tuple(expected)
        lines = await db.fetch(
            "SELECT p.sku, l.quantity, l.line_total FROM order_lines l JOIN products p"
            " ON p.id = l.product_id WHERE l.order_id = $1 ORDER BY l.id",
            order_id,
        )
        assert [(x.sku, x.quantity, x.line_total) for x in data.lines] == [tuple(r) for r in lines]
        assert sum((x.line_total for x in data.lines), Decimal(0)) > 0
    assert store.batchers["invoice_data"].flushes == 1

    shop_jobs = [await store.job(j["id"]) for j in jobs if j["kind"] == "SHOP_SYNC"]
    pushed = await asyncio.gather(*(store.products_to_sync(j) for j in shop_jobs))
    assert store.batchers["availability"].flushes == 1
    for job, products in zip(shop_jobs, pushed, strict=True):
        if job.product_id is not None:
            wanted = [job.product_id]
        else:
            wanted = [
                r["product_id"]
                for r in await db.fetch(
                    "SELECT DISTINCT product_id FROM order_lines WHERE order_id = $1 ORDER BY 1",
                    job.order_id,
                )
            ]
        assert [p.id for p in products] == wanted
        for p in products:
            available = await db.fetchval(
                "SELECT coalesce(sum(on_hand - reserved), 0)::int FROM stock_levels"
                " WHERE product_id = $1",
                p.id,
            )
            assert p.available == available


async def test_outcomes_are_one_update_and_a_repeat_is_not_another_attempt(
    store: JobStore, jobs: list[dict[str, Any]], db: asyncpg.Pool
) -> None:
    first, second = jobs[0]["id"], jobs[1]["id"]
    await asyncio.gather(
        store.succeeded(first, "INV-1"),
        store.succeeded(first, "INV-1"),  # a duplicate delivery finishing at the same time
        store.succeeded(second, None),
    )
    assert store.batchers["succeeded"].flushes == 1
    await store.succeeded(first, "INV-2")  # a late repeat of a job that already succeeded
    rows = {
        r["id"]: r
        for r in await db.fetch(
            "SELECT id, status::text, attempts, external_ref FROM integration_jobs"
            " WHERE id = ANY($1::bigint[])",
            [first, second],
        )
    }
    assert (rows[first]["status"], rows[first]["attempts"]) == ("SUCCEEDED", 1)
    assert rows[first]["external_ref"] == "INV-1"
    assert (rows[second]["status"], rows[second]["attempts"]) == ("SUCCEEDED", 1)
    untouched = await db.fetchval(
        "SELECT count(*) FROM integration_jobs WHERE idempotency_key LIKE 'batching-test:%'"
        " AND status = 'PENDING'"
    )
    assert untouched == len(jobs) - 2


async def test_acknowledgements_of_one_stream_are_one_xack(store: JobStore, redis_url: str) -> None:
    stream = "qm:test:batching-acks"
    redis = Redis.from_url(redis_url)
    try:
        await redis.delete(stream)
        await redis.xgroup_create(stream, WORKER_GROUP, id="0", mkstream=True)
        for i in range(5):
            await redis.xadd(stream, {"n": i})
        reply = await redis.xreadgroup(WORKER_GROUP, "c1", {stream: ">"}, count=10)
        ids = [e[0].decode() for e in reply[0][1]]
        assert (await redis.xpending(stream, WORKER_GROUP))["pending"] == 5
        await asyncio.gather(*(store.ack(stream, i) for i in ids[:4]))
        assert store.batchers[f"ack:{stream}"].flushes == 1
        pending = await redis.xpending(stream, WORKER_GROUP)
        assert pending["pending"] == 1 and pending["min"].decode() == ids[4]
    finally:
        await redis.delete(stream)
        await redis.aclose()

"""Gaps of the integration pipeline tests (issue 4), on the set-up of
``test_integration_pipeline.py`` (a database clone, Redis, sandbox and in-process API per test;
workers as real ``quartermaster worker`` subprocesses):

1. a real relay process SIGKILLed after its XADDs and before its mark-published commit (held
   there by a test-only PostgreSQL trigger, no fault hooks in the product): the next relay
   publishes the same rows again, the streams hold duplicates, the partners see every effect
   once;
2. outbox retention: ``Relay.cleanup()`` deletes only published rows older than
   ``outbox_retention_hours``; a deleted row is gone for ``outbox replay`` too; the relay
   process cleans up on its own;
3. the API's own /metrics (not only a worker's) shows jobs by status, lag and pending entries
   per consumer group.
"""

from __future__ import annotations

import asyncio
import re
import signal
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from quartermaster.config import DatabaseSettings, JobSettings
from quartermaster.db.engine import Database
from quartermaster.enums import IntegrationKind
from quartermaster.streams import DEAD_LETTER_STREAM, JOB_STREAMS, WORKER_GROUP
from quartermaster.workers.relay import Relay
from tests import test_integration_pipeline as base
from tests.pipeline_support import Pipeline, PlacedOrder

# The fixtures of the main pipeline module (a database clone, Redis, sandbox and API per test).
pipeline = base.pipeline

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def template(scratch_database: Any) -> base.Template:
    """As in the main module, under a database name of this module's own."""
    return base.make_template(scratch_database, "pipeline_gaps")


async def _equal(value: Awaitable[object], expected: object) -> bool:
    return await value == expected


def parse_metrics(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def stream_entries(p: Pipeline) -> Counter[int]:
    """Entries per job id over all job streams."""
    found = Counter[int]()
    for stream in JOB_STREAMS.values():
        found.update(await p.stream_job_ids(stream))
    return found


async def max_outbox_id(p: Pipeline) -> int:
    n: int = await p.pg.fetchval("SELECT coalesce(max(id), 0) FROM outbox")
    return n


def process_cmdline(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


async def outbox_ids(p: Pipeline) -> set[int]:
    return {r["id"] for r in await p.pg.fetch("SELECT id FROM outbox")}


# ---------------------------------------------------------------- 1. a real relay crash

#: Test-only: a row that goes from unpublished to published waits a minute first, so a relay
#: sits inside its mark-published UPDATE (after its XADDs) until the test kills it.
HANG_ON_PUBLISH = """
CREATE FUNCTION qm_test_hang_on_publish() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_sleep(60);
  RETURN NEW;
END $$;
CREATE TRIGGER qm_test_hang_on_publish BEFORE UPDATE ON outbox FOR EACH ROW
  WHEN (OLD.published_at IS NULL AND NEW.published_at IS NOT NULL)
  EXECUTE FUNCTION qm_test_hang_on_publish();
"""
DROP_HANG = """
DROP TRIGGER qm_test_hang_on_publish ON outbox;
DROP FUNCTION qm_test_hang_on_publish();
"""


async def test_relay_process_killed_after_xadd_before_marking_published(
    pipeline: Pipeline,
) -> None:
    p = pipeline
    products = p.catalog.products
    await p.pg.execute(HANG_ON_PUBLISH)
    orders = await p.place_orders(2, lambda i: [(products[i], 1)], concurrency=1)
    rows = await p.unpublished()
    assert rows == 4  # 2 × (order.placed + stock.changed)

    relay = p.start("worker", "--only-relay")

    # it claimed the rows, made the jobs, XADDed them all ...
    async def published_once() -> bool:
        entries = await stream_entries(p)
        jobs = await p.jobs()
        return len(jobs) == 6 and entries == Counter({j["id"]: 1 for j in jobs})

    await p.eventually(published_once, "the relay to XADD the 6 jobs", limit_s=20)

    # ... and hangs inside its mark-published UPDATE (on the connection holding the leader lock)
    async def hung_backend() -> int | None:
        pid: int | None = await p.pg.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event = 'PgSleep' AND query LIKE 'UPDATE outbox SET published_at%'"
        )
        return pid

    backend = await p.eventually(hung_backend, "the relay to hang in mark-published")
    assert await p.pg.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = $1",
        backend,
    ), "the hung backend is the relay leader's"

    # the process to kill is the relay itself (python -m quartermaster.cli), no wrapper
    cmdline = process_cmdline(relay.pid)
    assert b"quartermaster.cli" in cmdline and b"--only-relay" in cmdline, cmdline
    relay.kill()  # SIGKILL of the real process, mid-UPDATE
    assert relay.process.returncode == -signal.SIGKILL
    # The relay's session checks its client every second while a statement runs
    # (client_connection_check_interval): its backend ends by itself, mid-sleep, without
    # anyone terminating it (its transaction rolls back, its leader lock goes).

    async def backend_gone() -> bool:
        return not await p.pg.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", backend
        )

    await p.eventually(backend_gone, "the hung backend to end", limit_s=10)
    await p.pg.execute(DROP_HANG)
    assert await p.unpublished() == rows, "the dead relay marked nothing published"
    jobs = {r["id"]: r["kind"] for r in await p.jobs()}
    assert set(await p.statuses()) == {"PENDING"}
    first_stock = Counter(e["outbox_id"] for e in await p.stock_events())
    stock_ids = await base.stock_outbox_ids(p)
    assert first_stock == Counter({i: 1 for i in stock_ids}) and len(stock_ids) == 2

    # a new relay publishes the same rows again: every job and stock event is in Redis twice
    relay2 = p.start("worker", "--only-relay")
    await p.eventually(lambda: _equal(p.unpublished(), 0), "the new relay to publish", 20)
    assert len(await p.jobs()) == 6, "the repeat found the jobs, it made no new ones"
    for kind, stream in JOB_STREAMS.items():
        entries = Counter(await p.stream_job_ids(stream))
        assert entries == Counter({j: 2 for j, k in jobs.items() if k == kind.value}), stream
    assert Counter(e["outbox_id"] for e in await p.stock_events()) == Counter(
        {i: 2 for i in stock_ids}
    )
    assert relay2.events("relay.leader"), relay2.tail()

    # a worker reads both copies of each job and still bills, notifies and syncs once
    p.start("worker", "--no-relay")
    await p.wait_all_succeeded(6)
    await p.eventually(lambda: _equal(p.group_pending(), 0), "both copies to be acknowledged")
    for stream in JOB_STREAMS.values():
        group = (await p.redis.xinfo_groups(stream))[0]
        newest = await p.redis.xrevrange(stream, count=1)
        assert newest, stream
        assert group["last-delivered-id"] == newest[0][0], stream  # the duplicates were read too
    await p.assert_each_effect_once(orders)
    assert (await p.effects())["counts"]["availability_pushes"] == 2
    await p.assert_attempts_counted_once()
    assert await p.redis.xlen(DEAD_LETTER_STREAM) == 0
    published = await p.pg.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
    assert published == rows


# ---------------------------------------------------------------- 2. outbox retention


async def test_outbox_retention_deletes_only_old_published_rows(pipeline: Pipeline) -> None:
    p = pipeline
    products = p.catalog.products

    async def place(i: int) -> tuple[PlacedOrder, set[int]]:
        before = await max_outbox_id(p)
        order = await p.place_order([(products[i], 1)])
        rows = await p.pg.fetch("SELECT id FROM outbox WHERE id > $1", before)
        return order, {r["id"] for r in rows}

    old, old_rows = await place(0)  # published 100 h ago: past the 72 h retention
    kept, kept_rows = await place(1)  # published 71 h ago: within it
    recent, recent_rows = await place(2)  # published now
    await base.relay_until_drained(p)
    waiting, waiting_rows = await place(3)  # created 200 h ago, never published
    assert all(len(rows) == 2 for rows in (old_rows, kept_rows, recent_rows, waiting_rows))

    async def age(ids: set[int], created_h: float, published_h: float | None) -> None:
        await p.pg.execute(
            "UPDATE outbox SET created_at = now() - make_interval(secs => $2::float8 * 3600),"
            " published_at = now() - make_interval(secs => $3::float8 * 3600)"
            " WHERE id = ANY($1::bigint[])",
            list(ids),
            created_h,
            published_h,
        )

    await age(old_rows, 101, 100)
    await age(kept_rows, 71.5, 71)
    await age(waiting_rows, 200, None)
    # many more old published rows than one delete batch (5,000) takes
    await p.pg.execute(
        "INSERT INTO outbox (topic, key, payload, created_at, published_at)"
        " SELECT 'test.retention', 'bulk:' || g, '{}'::jsonb,"
        " now() - interval '300 hours', now() - interval '299 hours'"
        " FROM generate_series(1, 11000) g"
    )
    assert await p.unpublished() == 2

    db = Database.connect(DatabaseSettings(url=p.database_url, replica_url=None, pool_size=2))
    try:
        relay = Relay(db, p.redis, JobSettings(outbox_retention_hours=72))
        assert await relay.cleanup() == 11_000 + len(old_rows)
        assert await outbox_ids(p) == kept_rows | recent_rows | waiting_rows
        assert await relay.cleanup() == 0  # nothing more to delete
    finally:
        await db.dispose()
    assert await p.unpublished() == 2  # the old unpublished rows are still there

    # Redis loses its data: a replay from before all of it can only republish what is left;
    # the deleted order's jobs (still PENDING, no worker ran) are not enqueued again
    await p.redis.flushall()
    since = await p.pg.fetchval("SELECT date_trunc('second', now() - interval '400 hours')")
    replay = p.start("outbox", "replay", "--since", since.strftime("%Y-%m-%dT%H:%M:%S%z"))
    assert await replay.wait(30) == 0, replay.text()
    match = re.search(r"replayed (\d+) outbox events since .*; (\d+) jobs enqueued", replay.text())
    assert match, replay.text()
    # --since lies beyond the retention window (72 h): the command says what cannot come back
    assert "warning: published outbox rows are kept 72 h" in replay.text(), replay.text()
    assert (int(match[1]), int(match[2])) == (4, 6)  # kept + recent: 2 rows, 3 jobs each

    async def jobs_of(*orders: PlacedOrder) -> set[int]:
        rows = await p.pg.fetch(
            "SELECT id FROM integration_jobs WHERE order_id = ANY($1)", [o.pk for o in orders]
        )
        return {r["id"] for r in rows}

    assert len(await jobs_of(old)) == 3
    assert await p.statuses() == Counter({"PENDING": 9})
    assert await stream_entries(p) == Counter(dict.fromkeys(await jobs_of(kept, recent), 1))
    stock = [e["outbox_id"] for e in await p.stock_events()]
    assert sorted(stock) == sorted(
        await p.pg.fetchval(
            "SELECT array_agg(id) FROM outbox WHERE topic = 'stock.changed' AND id = ANY($1)",
            list(kept_rows | recent_rows),
        )
    )

    # the relay process cleans up by itself (on its first round as leader), here with a 24 h
    # retention: the 71-hour-old rows go, the waiting order's rows are published and stay
    worker = p.start("worker", "--only-relay", QM_OUTBOX_RETENTION_HOURS=24)

    async def cleaned() -> bool:
        return bool(worker.events("relay.outbox_cleanup")) and await p.unpublished() == 0

    await p.eventually(cleaned, "the relay process to clean up", limit_s=20)
    assert [e["deleted"] for e in worker.events("relay.outbox_cleanup")] == [len(kept_rows)]
    assert await outbox_ids(p) == recent_rows | waiting_rows
    assert await jobs_of(waiting) <= set(await stream_entries(p))


# ---------------------------------------------------------------- 3. the API's /metrics


async def test_api_metrics_show_jobs_by_status_and_stream_lag_and_pending(
    pipeline: Pipeline,
) -> None:
    """The issue: "/metrics (of the API and of each worker) shows jobs by status, stream lag and
    pending count per group, partner latency and breaker state". The worker's /metrics is
    checked in ``test_integration_pipeline.py``; this is the API's, scraped once (its pipeline
    figures are taken on a scrape, at most every 5 s) after a worker finished an order.
    Partner latency and breaker state live in the worker processes: the API shows what each
    worker reports of them (``test_api_metrics_show_each_workers_partner_calls_and_breakers``)."""
    p = pipeline
    a, b = p.catalog.products[:2]
    p.start("worker")
    await p.place_order([(a, 2), (b, 1)], customer=2)
    await p.wait_all_succeeded(3)  # INVOICE, NOTIFICATION, SHOP_SYNC
    await p.eventually(lambda: _equal(p.group_pending(), 0), "the entries to be acknowledged")

    response = await p.api.get("/metrics")
    assert response.status_code == 200
    samples = parse_metrics(response.text)
    for kind in IntegrationKind:
        assert sample(samples, "qm_integration_jobs", kind=kind.value, status="SUCCEEDED") == 1
        for status in ("PENDING", "FAILED", "DEAD"):
            assert not sample(samples, "qm_integration_jobs", kind=kind.value, status=status)
    for stream in JOB_STREAMS.values():
        assert sample(samples, "qm_stream_pending", stream=stream, group=WORKER_GROUP) == 0
        assert sample(samples, "qm_stream_lag", stream=stream, group=WORKER_GROUP) == 0
        length = sample(samples, "qm_stream_length", stream=stream)
        assert length is not None and length <= 1  # the worker may have trimmed its entry
    assert sample(samples, "qm_outbox_unpublished") == 0
    assert sample(samples, "qm_jobs_retry_scheduled") == 0
    assert sample(samples, "qm_redis_up") == 1


async def test_api_metrics_job_counts_follow_jobs_out_of_a_status(pipeline: Pipeline) -> None:
    """A status a job leaves must not keep its old count on /metrics: once every job of an
    order succeeded, PENDING shows 0 (or no sample), not what it was at the previous scrape."""
    p = pipeline
    p.start("worker", "--only-relay")
    await p.place_order([(p.catalog.products[0], 1)])
    await p.eventually(
        lambda: _equal(p.statuses(), Counter({"PENDING": 3})), "the relay to make the jobs"
    )
    before = parse_metrics((await p.api.get("/metrics")).text)
    scraped_at = asyncio.get_running_loop().time()
    for kind in IntegrationKind:
        assert sample(before, "qm_integration_jobs", kind=kind.value, status="PENDING") == 1

    p.start("worker", "--no-relay")
    await p.wait_all_succeeded(3)
    # the API takes new pipeline figures at most every 5 s (http.PIPELINE_REFRESH_S)
    await asyncio.sleep(max(0.0, scraped_at + 5.2 - asyncio.get_running_loop().time()))
    after = parse_metrics((await p.api.get("/metrics")).text)
    for kind in IntegrationKind:
        assert sample(after, "qm_integration_jobs", kind=kind.value, status="SUCCEEDED") == 1
    stale = {
        kind.value: sample(after, "qm_integration_jobs", kind=kind.value, status="PENDING")
        for kind in IntegrationKind
    }
    assert stale == {kind.value: 0 for kind in IntegrationKind}  # shown as 0, not as before


async def test_api_metrics_show_each_workers_partner_calls_and_breakers(
    pipeline: Pipeline,
) -> None:
    """Each worker reports its breaker states and partner call counts to Redis every few
    seconds; the API's /metrics shows them per worker, and a worker that stops is dropped."""
    p = pipeline
    worker = p.start("worker")
    await p.place_order([(p.catalog.products[0], 1)])
    await p.wait_all_succeeded(3)

    async def scrape() -> Samples:
        return parse_metrics((await p.api.get("/metrics")).text)

    def of_partner(samples: Samples, name: str, partner: str) -> dict[str, float]:
        """{worker: value} of metric ``name`` for ``partner`` (outcome "ok" where it has one)."""
        found: dict[str, float] = {}
        for (metric, labels), value in samples.items():
            d = dict(labels)
            if metric == name and d.get("partner") == partner and d.get("outcome", "ok") == "ok":
                found[d["worker"]] = value
        return found

    async def reported() -> bool:
        samples = await scrape()
        return all(
            sum(of_partner(samples, "qm_worker_partner_requests", partner).values()) >= 1
            for partner in ("invoicing", "shop", "notifications")
        )

    # the worker reports every 5 s, the API takes new figures at most every 5 s
    await p.eventually(reported, "the worker's partner calls on the API's /metrics", limit_s=20)
    samples = await scrape()
    assert sample(samples, "qm_workers_reporting") == 1
    calls = of_partner(samples, "qm_worker_partner_requests", "invoicing")
    (name,) = calls  # one worker, named by host and pid
    assert calls[name] == 1  # one invoice
    seconds = of_partner(samples, "qm_worker_partner_request_seconds_sum", "invoicing")
    assert 0 < seconds[name] < 5  # the sandbox answers at once
    for partner in ("invoicing", "shop", "notifications"):
        assert of_partner(samples, "qm_worker_partner_breaker_state", partner) == {name: 0}

    assert await worker.terminate() == 0
    gone = await p.redis.zrange("qm:workers", 0, -1)
    assert gone == []  # a stopping worker withdraws its report

    async def dropped() -> bool:
        return sample(await scrape(), "qm_workers_reporting") == 0

    await p.eventually(dropped, "the stopped worker to leave the API's /metrics", limit_s=15)
    assert of_partner(await scrape(), "qm_worker_partner_breaker_state", "invoicing") == {}

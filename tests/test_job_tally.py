"""``JobTally``: jobs by kind and status for /metrics, counted incrementally, always exact.

Each step changes job rows the way the pipeline does (new PENDING jobs, outcomes, a retry of a
DEAD job) and checks the tally against a full ``GROUP BY`` of the table, on a database of its
own so that no other test's jobs are counted.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from quartermaster.config import DatabaseSettings
from quartermaster.db.engine import Database
from quartermaster.db.migrate import upgrade
from quartermaster.db.repositories import integration as repo
from quartermaster.workers.monitor import JobTally
from tests.conftest import asyncpg_kwargs


@pytest.fixture(scope="module")
def tally_url(scratch_database: Callable[[str], str]) -> str:
    url = scratch_database("tally")
    upgrade(url)
    return url


@pytest_asyncio.fixture
async def pg(tally_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(**asyncpg_kwargs(tally_url))
    await conn.execute("TRUNCATE integration_jobs RESTART IDENTITY")
    try:
        yield conn
    finally:
        await conn.close()


@pytest_asyncio.fixture
async def db(tally_url: str) -> AsyncIterator[Database]:
    database = Database.connect(DatabaseSettings(url=tally_url, replica_url=None, pool_size=1))
    try:
        yield database
    finally:
        await database.dispose()


async def add_jobs(
    pg: asyncpg.Connection, kind: str, n: int, *, ids: list[int] | None = None
) -> None:
    keys = [f"{kind}:{uuid.uuid4()}" for _ in range(n)]
    if ids is None:
        await pg.execute(
            "INSERT INTO integration_jobs (kind, status, idempotency_key, attempts)"
            " SELECT $1, 'PENDING', k, 0 FROM unnest($2::text[]) AS k",
            kind,
            keys,
        )
    else:  # a job whose id was drawn earlier than others but committed after them
        await pg.execute(
            "INSERT INTO integration_jobs (id, kind, status, idempotency_key, attempts)"
            " SELECT i, $1, 'PENDING', k, 0 FROM unnest($2::bigint[], $3::text[]) AS t(i, k)",
            kind,
            ids,
            keys,
        )


async def set_status(pg: asyncpg.Connection, status: str, where: str, *args: Any) -> None:
    await pg.execute(f"UPDATE integration_jobs SET status = '{status}' WHERE {where}", *args)


async def counts(db: Database, tally: JobTally, now: float) -> dict[tuple[str, str], int]:
    async with db.reader("primary").connect() as conn:
        return await tally.counts(conn, now=now)


async def check(db: Database, tally: JobTally, now: float) -> dict[tuple[str, str], int]:
    """The tally at ``now``, after checking it against a full count."""
    counted = await counts(db, tally, now)
    async with db.reader("primary").connect() as conn:
        exact = await repo.count_by_status(conn)
    # the tally also names a kind's SUCCEEDED when it has none (0), as the gauges do
    assert {k: v for k, v in counted.items() if v} == exact
    return counted


async def test_tally_follows_every_change_exactly(pg: asyncpg.Connection, db: Database) -> None:
    tally = JobTally(settle_s=30, recount_s=3600)
    await add_jobs(pg, "INVOICE", 5)
    await add_jobs(pg, "SHOP_SYNC", 3)
    assert await check(db, tally, now=0) == {
        ("INVOICE", "PENDING"): 5,
        ("SHOP_SYNC", "PENDING"): 3,
        ("INVOICE", "SUCCEEDED"): 0,
        ("SHOP_SYNC", "SUCCEEDED"): 0,
    }
    # outcomes, more jobs, a DEAD one revived
    await set_status(pg, "SUCCEEDED", "kind = 'INVOICE' AND id <= 3")
    await set_status(pg, "DEAD", "id = 4")
    await add_jobs(pg, "NOTIFICATION", 2)
    await check(db, tally, now=10)
    await set_status(pg, "FAILED", "id = 4")
    await check(db, tally, now=20)

    # 40 s on, the ids seen at 0 s are settled: only newer ids are counted from now on ...
    await check(db, tally, now=40)
    await add_jobs(pg, "INVOICE", 4)
    await set_status(pg, "SUCCEEDED", "status <> 'SUCCEEDED'")
    counted = await check(db, tally, now=50)
    assert counted[("INVOICE", "SUCCEEDED")] == 9
    assert counted[("SHOP_SYNC", "SUCCEEDED")] == 3

    # ... and a job with an id below the newest one seen, committed late, is still counted,
    # because the ids seen in the last 30 s are not settled yet
    newest = await pg.fetchval("SELECT max(id) FROM integration_jobs")
    await pg.execute("DELETE FROM integration_jobs WHERE id = $1", newest - 1)
    await check(db, tally, now=60)  # the settled mark does not pass a gap seen < 30 s ago
    await add_jobs(pg, "SHOP_SYNC", 1, ids=[newest - 1])
    counted = await check(db, tally, now=70)
    assert counted[("SHOP_SYNC", "PENDING")] == 1


async def test_rows_deleted_by_hand_are_right_again_after_the_recount(
    pg: asyncpg.Connection, db: Database
) -> None:
    tally = JobTally(settle_s=0, recount_s=100)
    await add_jobs(pg, "INVOICE", 6)
    await set_status(pg, "SUCCEEDED", "TRUE")
    await check(db, tally, now=0)
    await check(db, tally, now=1)  # everything settled
    await pg.execute("DELETE FROM integration_jobs WHERE id <= 2")
    stale = await counts(db, tally, now=2)
    assert stale[("INVOICE", "SUCCEEDED")] == 6, "deletions are not noticed between recounts"
    assert await check(db, tally, now=150) == {("INVOICE", "SUCCEEDED"): 4}


async def test_a_settled_tally_reads_only_new_ids_and_open_jobs(
    pg: asyncpg.Connection, db: Database
) -> None:
    tally = JobTally(settle_s=0, recount_s=3600)
    await add_jobs(pg, "INVOICE", 50)
    await set_status(pg, "SUCCEEDED", "TRUE")
    await check(db, tally, now=0)
    await check(db, tally, now=1)
    async with db.reader("primary").connect() as conn:
        rows = await repo.tally_rows(conn, above=50, settle_to=50)
    assert rows == [], "nothing above the settled id and nothing open: nothing to count"


async def test_jobs_created_before_the_settle_window_settle_at_the_first_count(
    pg: asyncpg.Connection, db: Database
) -> None:
    tally = JobTally(settle_s=30, recount_s=3600)
    await add_jobs(pg, "INVOICE", 4)
    await pg.execute(
        "UPDATE integration_jobs SET status = 'SUCCEEDED', created_at = now() - interval '1 hour'"
    )
    await add_jobs(pg, "INVOICE", 1)  # fresh: not settled yet
    await check(db, tally, now=0)
    # a settled row deleted by hand goes unnoticed until the recount; the fresh one is recounted
    await pg.execute("DELETE FROM integration_jobs WHERE id IN (1, 5)")
    counted = await counts(db, tally, now=1)
    assert counted[("INVOICE", "SUCCEEDED")] == 4, "the old jobs were settled at the start"
    assert ("INVOICE", "PENDING") not in counted, "the fresh one's deletion was seen"

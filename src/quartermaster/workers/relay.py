"""The outbox relay: committed outbox rows → job rows + Redis stream entries, in commit order
per stock level and per order.

One round (``relay_once``):

1. claim the oldest committed unpublished rows (``FOR UPDATE SKIP LOCKED``; see
   ``db/repositories/integration.py`` for the order rule), create their jobs
   (``integration_jobs``, upsert on the idempotency key) and commit, so a worker never reads an
   entry whose job it cannot see;
2. ``XADD`` the jobs to their stream and every stock change to the stock-event stream;
3. mark the rows published.

Several relays may run (one per worker process, say): they elect a leader with a session-level
advisory lock held on the connection every round runs on, so one relay publishes at a time and
the order holds; when the leader's process or connection dies its lock goes with it and a
standby takes over within ``STANDBY_POLL_S``. A relay that dies between 2 and 3 leaves its rows
unpublished: the next round publishes them again (duplicate stream entries; readers dedupe).

While Redis is down step 2 fails, rows stay unpublished, mutations go on committing; the relay
retries with backoff and the rows drain when Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection

from quartermaster.config import JobSettings
from quartermaster.db.engine import Database
from quartermaster.db.repositories import integration as repo
from quartermaster.enums import IntegrationKind, IntegrationStatus
from quartermaster.services.integration import jobs_for_events, retried_job_ids
from quartermaster.streams import STOCK_EVENTS_STREAM, job_stream

log = structlog.get_logger(__name__)

#: pg advisory lock key of the relay leader ("qm-relay").
RELAY_LOCK_KEY = 0x716D2D72656C6179
STANDBY_POLL_S = 1.0
_CONNECTION_CHECK = text(
    "SELECT set_config('client_connection_check_interval', '1s', false) "
    "WHERE current_setting('server_version_num')::int >= 140000"
)
CLEANUP_EVERY_S = 60.0


class Relay:
    def __init__(
        self,
        db: Database,
        redis: Redis,
        settings: JobSettings,
        on_published: Callable[[int], None] | None = None,
    ) -> None:
        self.on_published = on_published
        self.db = db
        self.redis = redis
        self.settings = settings
        self._conn: AsyncConnection | None = None
        self.published = 0
        self.is_leader = False
        self.last_error: str | None = None

    async def _leader(self) -> AsyncConnection | None:
        """The connection holding the leader lock, or None while another relay leads."""
        if self._conn is None:
            conn = await self.db.primary.connect()
            try:
                # The leader's lock goes with its session. PostgreSQL notices a client that
                # died mid-statement (a lock wait, a slow UPDATE) only when it next talks to
                # it, unless it checks the socket while the statement runs: every second here
                # (PostgreSQL 14+), so a standby takes over promptly.
                await conn.execute(_CONNECTION_CHECK)
                got = (
                    await conn.execute(
                        text("SELECT pg_try_advisory_lock(:k)"), {"k": RELAY_LOCK_KEY}
                    )
                ).scalar()
                await conn.commit()
            except BaseException:
                await conn.close()
                raise
            if not got:
                await conn.close()
                if self.is_leader:
                    log.info("relay.standby")
                self.is_leader = False
                return None
            self._conn = conn
            self.is_leader = True
            log.info("relay.leader")
        return self._conn

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        self.is_leader = False
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.invalidate()
            with contextlib.suppress(Exception):
                await conn.close()

    async def relay_once(self) -> int:
        """One round; returns how many outbox rows were published (0 when standing by)."""
        conn = await self._leader()
        if conn is None:
            return 0
        try:
            rows = await repo.claim_outbox_batch(conn, self.settings.relay_batch)
            if not rows:
                await conn.commit()
                return 0
            jobs = await jobs_of(conn, rows)
            await conn.commit()
        except (OperationalError, InterfaceError, OSError, DBAPIError):
            await self._drop_connection()
            raise
        await publish(self.redis, rows, jobs, self.settings, statuses=(IntegrationStatus.PENDING,))
        try:
            await repo.mark_published(conn, [r.id for r in rows])
            await conn.commit()
        except (OperationalError, InterfaceError, OSError, DBAPIError):
            await self._drop_connection()
            raise
        self.published += len(rows)
        if self.on_published is not None:
            self.on_published(len(rows))
        log.debug("relay.published", rows=len(rows), jobs=len(jobs))
        return len(rows)

    async def cleanup(self) -> int:
        """Delete published rows older than the retention window (batches of 5,000)."""
        cutoff = datetime.now(UTC) - timedelta(hours=self.settings.outbox_retention_hours)
        deleted = 0
        while True:
            async with self.db.primary.begin() as conn:
                n = await repo.delete_published_before(conn, cutoff, 5_000)
            deleted += n
            if n < 5_000:
                break
        if deleted:
            log.info("relay.outbox_cleanup", deleted=deleted)
        return deleted

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set: at once while rows are waiting, else every poll
        interval; Redis or database outages back off up to 5 s and never end the loop."""
        backoff = 0.0
        next_cleanup = 0.0
        loop = asyncio.get_running_loop()
        try:
            while not stop.is_set():
                try:
                    n = await self.relay_once()
                    if self.is_leader and loop.time() >= next_cleanup:
                        next_cleanup = loop.time() + CLEANUP_EVERY_S
                        await self.cleanup()
                    if self.last_error is not None:
                        log.info("relay.recovered")
                        self.last_error = None
                    backoff = 0.0
                except (RedisError, OSError, DBAPIError, OperationalError, InterfaceError) as exc:
                    backoff = min(5.0, max(0.1, backoff * 2))
                    message = f"{type(exc).__name__}: {exc}"
                    if message != self.last_error:
                        log.warning("relay.error", error=message, retry_in_s=backoff)
                    self.last_error = message
                    await _sleep_or_stop(stop, backoff)
                    continue
                if n >= self.settings.relay_batch:
                    continue
                await _sleep_or_stop(
                    stop, self.settings.relay_poll_s if self.is_leader else STANDBY_POLL_S
                )
        finally:
            await self._drop_connection()


async def jobs_of(conn: AsyncConnection, rows: Sequence[Any]) -> list[Any]:
    """The jobs of outbox ``rows``: those their events cause (created, or found when they
    exist), plus those ``retryIntegrationJob`` put back (``job.retry`` events), each once."""
    jobs = await repo.upsert_jobs(conn, [s.as_row() for s in jobs_for_events(rows)])
    seen = {j.id for j in jobs}
    retried = await repo.jobs_by_ids(conn, retried_job_ids(rows))
    return jobs + [j for j in retried if j.id not in seen]


async def publish(
    redis: Redis,
    rows: Sequence[Any],
    jobs: Sequence[Any],
    settings: JobSettings,
    *,
    statuses: tuple[IntegrationStatus, ...],
) -> None:
    """XADD the jobs whose status is in ``statuses`` and every stock change, in one pipeline."""
    pipe = redis.pipeline(transaction=False)
    for job in jobs:
        status = IntegrationStatus(job.status)
        if status not in statuses:
            continue
        kind = IntegrationKind(job.kind)
        pipe.xadd(
            job_stream(kind), {"job_id": job.id, "kind": kind.value, "key": job.idempotency_key}
        )
    for row in rows:
        if row.topic != "stock.changed":
            continue
        pipe.xadd(
            STOCK_EVENTS_STREAM,
            {
                "outbox_id": row.id,
                "occurred_at": row.created_at.isoformat(),
                "payload": orjson.dumps(row.payload),
            },
            maxlen=settings.stock_events_maxlen,
            approximate=True,
        )
    await pipe.execute()


async def replay(
    db: Database, redis: Redis, settings: JobSettings, since: datetime, batch: int = 1_000
) -> tuple[int, int]:
    """Publish again the published outbox rows created at or after ``since`` (for a Redis that
    lost its data). Jobs that already succeeded or are DEAD are not enqueued again; returns
    (events, jobs enqueued)."""
    after = 0
    events = jobs_enqueued = 0
    while True:
        async with db.primary.begin() as conn:
            rows = await repo.published_since(conn, since, after, batch)
            if not rows:
                return events, jobs_enqueued
            jobs = await jobs_of(conn, rows)
        wanted = (IntegrationStatus.PENDING, IntegrationStatus.FAILED)
        await publish(redis, rows, jobs, settings, statuses=wanted)
        events += len(rows)
        jobs_enqueued += sum(1 for j in jobs if IntegrationStatus(j.status) in wanted)
        after = rows[-1].id
        log.info("outbox.replay", events=events, jobs=jobs_enqueued, last_id=after)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)

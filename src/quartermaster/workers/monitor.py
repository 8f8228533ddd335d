"""Pipeline figures for /metrics (of the API and of every worker): jobs by status, outbox
backlog, stream length, lag and pending entries per consumer group, scheduled retries, and
what each live worker reported of its partners (breaker states, call counts and seconds)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import text

from quartermaster.db.engine import Database
from quartermaster.db.repositories import integration as repo
from quartermaster.streams import (
    DEAD_LETTER_STREAM,
    JOB_STREAMS,
    RETRY_SCHEDULE,
    STOCK_EVENTS_STREAM,
    WORKER_REPORTS,
    worker_report_key,
)

LAG_SCAN_LIMIT = 10_000
#: A worker's report counts for this long (it reports every few seconds while it runs).
REPORT_TTL_S = 30


#: Ids older than this were committed (or rolled back) for good: transactions are short.
SETTLE_S = 30.0
#: Everything is counted afresh this often, in case job rows were deleted by hand.
RECOUNT_S = 600.0


class JobTally:
    """Jobs by kind and status without scanning every job at each refresh.

    SUCCEEDED is final and jobs are not deleted, so per kind SUCCEEDED = all jobs - the
    PENDING, FAILED and DEAD ones. Those are counted exactly every time (the status index: as
    many rows as are not done, the backlog the figure is for). All jobs of a kind only grow:
    they are counted once up to a settled id (one seen ``SETTLE_S`` ago: ids are drawn before
    commit, so a newer one may still be joined by a smaller one), then only the ids above it.
    Jobs created ``SETTLE_S`` before the tally starts (or recounts) are settled at once.
    Everything is recounted every ``RECOUNT_S``. At 500,000–600,000 jobs the full count this
    replaces took 100–155 ms of PostgreSQL time per refresh, every 5 s in each worker and API
    process.
    """

    def __init__(self, *, settle_s: float = SETTLE_S, recount_s: float = RECOUNT_S) -> None:
        self.settle_s = settle_s
        self.recount_s = recount_s
        self._settled_id = 0
        self._settled: dict[str, int] = {}
        self._seen: list[tuple[float, int]] = []  # (when, highest id) of recent refreshes
        self._recounted_at: float | None = None

    async def counts(self, conn: Any, now: float | None = None) -> dict[tuple[str, str], int]:
        now = time.monotonic() if now is None else now
        if self._recounted_at is None or now - self._recounted_at >= self.recount_s:
            self._settled_id, self._settled, self._seen = 0, {}, []
            self._recounted_at = now
            # jobs created long enough ago settle at once: no full count per refresh at start
            self._seen.append(
                (now - self.settle_s, await repo.highest_job_id_before(conn, self.settle_s))
            )
        settle_to = self._settled_id
        while self._seen and self._seen[0][0] <= now - self.settle_s:
            settle_to = max(settle_to, self._seen.pop(0)[1])
        totals = dict(self._settled)
        not_done: dict[tuple[str, str], int] = {}
        highest = self._settled_id
        for row in await repo.tally_rows(conn, self._settled_id, settle_to):
            kind, status, settled, count, top = tuple(row)
            if status is None:
                self._settled[kind] = self._settled.get(kind, 0) + int(settled)
                totals[kind] = totals.get(kind, 0) + int(count)
                highest = max(highest, int(top))
            else:
                not_done[(kind, status)] = int(count)
        self._settled_id = settle_to
        self._seen.append((now, highest))
        result = dict(not_done)
        for kind, total in totals.items():
            others = sum(n for (k, _), n in not_done.items() if k == kind)
            result[(kind, "SUCCEEDED")] = max(0, total - others)
        return result


@dataclass
class PipelineSnapshot:
    jobs: dict[tuple[str, str], int] = field(default_factory=dict)
    outbox_unpublished: int = 0
    stream_length: dict[str, int] = field(default_factory=dict)
    group_pending: dict[tuple[str, str], int] = field(default_factory=dict)
    group_lag: dict[tuple[str, str], int] = field(default_factory=dict)
    retries_scheduled: int = 0
    redis_ok: bool = True
    #: worker name → its last report (``publish_report``), for the workers alive lately.
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)


async def snapshot(db: Database, redis: Redis | None, tally: JobTally | None) -> PipelineSnapshot:
    """The figures as they are now; ``tally`` (kept by the caller between refreshes) counts
    the jobs, None counts them all afresh."""
    snap = PipelineSnapshot()
    async with db.reader("primary").connect() as conn:
        if tally is None:
            snap.jobs = await repo.count_by_status(conn)
        else:
            snap.jobs = await tally.counts(conn)
        snap.outbox_unpublished = int(
            (
                await conn.execute(text("SELECT count(*) FROM outbox WHERE published_at IS NULL"))
            ).scalar_one()
        )
    if redis is None:
        snap.redis_ok = False
        return snap
    try:
        for stream in [*JOB_STREAMS.values(), DEAD_LETTER_STREAM, STOCK_EVENTS_STREAM]:
            snap.stream_length[stream] = int(await redis.xlen(stream))
        for stream in JOB_STREAMS.values():
            try:
                groups: Any = await redis.xinfo_groups(stream)
            except RedisError:
                continue
            for group in groups:
                name = _s(group["name"])
                snap.group_pending[(stream, name)] = int(group.get("pending", 0))
                lag = group.get("lag")
                if lag is None:  # Redis 6.2 has no lag field: count what is left to read
                    last = _s(group["last-delivered-id"])
                    rest = await redis.xrange(stream, min=f"({last}", count=LAG_SCAN_LIMIT)
                    lag = len(rest or [])
                snap.group_lag[(stream, name)] = int(lag)
        snap.retries_scheduled = int(await redis.zcard(RETRY_SCHEDULE))
        snap.workers = await worker_reports(redis)
    except RedisError:
        snap.redis_ok = False
    return snap


async def publish_report(redis: Redis, name: str, report: dict[str, Any]) -> None:
    """Publish a worker's report (its key expires unless renewed; the index is pruned by
    readers)."""
    pipe = redis.pipeline(transaction=True)
    pipe.set(worker_report_key(name), orjson.dumps(report), ex=REPORT_TTL_S)
    pipe.zadd(WORKER_REPORTS, {name: time.time()})
    await pipe.execute()


async def withdraw_report(redis: Redis, name: str) -> None:
    """A worker that stops takes its report away."""
    pipe = redis.pipeline(transaction=True)
    pipe.zrem(WORKER_REPORTS, name)
    pipe.delete(worker_report_key(name))
    await pipe.execute()


async def worker_reports(redis: Redis) -> dict[str, dict[str, Any]]:
    """The reports of the workers that published within ``REPORT_TTL_S``."""
    cutoff = time.time() - REPORT_TTL_S
    await redis.zremrangebyscore(WORKER_REPORTS, "-inf", cutoff)
    names = [_s(n) for n in await redis.zrangebyscore(WORKER_REPORTS, cutoff, "+inf")]
    if not names:
        return {}
    reports: dict[str, dict[str, Any]] = {}
    raws = await redis.mget([worker_report_key(n) for n in names])
    for name, raw in zip(names, raws, strict=True):
        if raw is None:
            continue
        try:
            report = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(report, dict):
            reports[name] = report
    return reports


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

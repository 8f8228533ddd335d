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


async def snapshot(db: Database, redis: Redis | None) -> PipelineSnapshot:
    snap = PipelineSnapshot()
    async with db.reader("primary").connect() as conn:
        snap.jobs = await repo.count_by_status(conn)
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

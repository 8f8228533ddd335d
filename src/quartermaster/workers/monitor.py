"""Pipeline figures for /metrics (of the API and of every worker): jobs by status, outbox
backlog, stream length, lag and pending entries per consumer group, scheduled retries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
)

LAG_SCAN_LIMIT = 10_000


@dataclass
class PipelineSnapshot:
    jobs: dict[tuple[str, str], int] = field(default_factory=dict)
    outbox_unpublished: int = 0
    stream_length: dict[str, int] = field(default_factory=dict)
    group_pending: dict[tuple[str, str], int] = field(default_factory=dict)
    group_lag: dict[tuple[str, str], int] = field(default_factory=dict)
    retries_scheduled: int = 0
    redis_ok: bool = True


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
    except RedisError:
        snap.redis_ok = False
    return snap


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

"""Job workers: consumer groups on the job streams, retries, breakers, dead letters.

Delivery is at-least-once. An entry is acknowledged only after the job's outcome is in the
database and, when it must run again, after its retry is scheduled (one MULTI). A worker that
dies leaves its entries pending; ``XAUTOCLAIM`` hands them to another worker once they have been
idle for ``claim_idle_s``. Retries wait in a sorted set (``streams.RETRY_SCHEDULE``) and are moved
back onto their stream when due by a Lua script, atomically, by whichever worker gets there first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from quartermaster.config import JobSettings
from quartermaster.db.engine import Database
from quartermaster.db.repositories import integration as repo
from quartermaster.enums import IntegrationKind, IntegrationStatus
from quartermaster.integrations.clients import Clients
from quartermaster.integrations.errors import PermanentError, RetryableError
from quartermaster.streams import (
    DEAD_LETTER_STREAM,
    JOB_STREAMS,
    RETRY_SCHEDULE,
    WORKER_GROUP,
    job_stream,
)
from quartermaster.workers.handlers import HANDLERS, PARTNER_OF, NotConfiguredError
from quartermaster.workers.retry import CircuitBreaker, backoff_delay
from quartermaster.workers.store import JobStore

log = structlog.get_logger(__name__)

# Moves due retries back onto their streams: XADD + ZREM per member, atomically, so two workers
# never both enqueue the same retry. (The target streams are named in the members.)
_MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  local e = cjson.decode(member)
  redis.call('XADD', e.stream, '*', 'job_id', e.job_id, 'kind', e.kind, 'key', e.key)
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""


@dataclass
class WorkerStats:
    """What a worker did, for its /metrics and for tests."""

    outcomes: dict[tuple[str, str], int] = field(default_factory=dict)

    def count(self, kind: IntegrationKind, outcome: str) -> None:
        key = (kind.value, outcome)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1


class Worker:
    def __init__(
        self,
        db: Database,
        redis: Redis,
        clients: Clients,
        settings: JobSettings,
        *,
        concurrency: int | None = None,
        name: str | None = None,
        kinds: Iterable[IntegrationKind] = tuple(IntegrationKind),
        metrics: Any = None,
    ) -> None:
        self.db = db
        self.redis = redis
        self.clients = clients
        self.settings = settings
        self.concurrency = concurrency or settings.concurrency
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.streams = {job_stream(kind): kind for kind in kinds}
        self.breakers = {
            partner: CircuitBreaker(
                partner, settings.breaker_threshold, settings.breaker_cooldown_s
            )
            for partner in PARTNER_OF.values()
        }
        self.metrics = metrics
        self.stats = WorkerStats()
        self.rng = random.Random()
        self._slots = asyncio.Semaphore(self.concurrency)
        self._inflight: dict[asyncio.Task[None], tuple[str, str, dict[Any, Any]]] = {}
        self._move_due = self.redis.register_script(_MOVE_DUE)
        #: Job rows, handler reads, outcomes and acknowledgements, batched across jobs.
        self.store = JobStore(db, redis)

    def _count(self, kind: IntegrationKind, outcome: str) -> None:
        self.stats.count(kind, outcome)
        if self.metrics is not None:
            self.metrics.jobs.labels(kind.value, outcome).inc()

    # ------------------------------------------------------------------ lifecycle

    async def ensure_groups(self) -> None:
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, WORKER_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then let in-flight jobs finish for the grace period and
        hand back the rest (re-added to their stream, then acknowledged)."""
        loops = [
            asyncio.create_task(self._guard(self._read_loop, stop), name="worker-read"),
            asyncio.create_task(self._guard(self._claim_loop, stop), name="worker-claim"),
            asyncio.create_task(self._guard(self._schedule_loop, stop), name="worker-schedule"),
            asyncio.create_task(self._guard(self._trim_loop, stop), name="worker-trim"),
        ]
        try:
            await stop.wait()
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await self._drain()
            await self.store.aclose()

    async def _drain(self) -> None:
        pending = set(self._inflight)
        if pending:
            log.info("worker.draining", jobs=len(pending), grace_s=self.settings.shutdown_grace_s)
            _, pending = await asyncio.wait(pending, timeout=self.settings.shutdown_grace_s)
        for task in pending:
            stream, entry_id, fields = self._inflight[task]
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            with contextlib.suppress(RedisError):
                pipe = self.redis.pipeline(transaction=True)
                pipe.xadd(stream, dict(fields))
                pipe.xack(stream, WORKER_GROUP, entry_id)
                await pipe.execute()
                log.info("worker.handed_back", stream=stream, entry=entry_id)

    async def _guard(self, loop: Any, stop: asyncio.Event) -> None:
        """Keep a loop alive through Redis/database outages (backing off up to 5 s)."""
        backoff = 0.0
        while not stop.is_set():
            try:
                await loop(stop)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                backoff = min(5.0, max(0.2, backoff * 2))
                log.warning("worker.loop_error", loop=loop.__name__, error=repr(exc))
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    with contextlib.suppress(Exception):
                        await self.ensure_groups()
                await _sleep_or_stop(stop, backoff)

    # ------------------------------------------------------------------ loops

    async def _read_loop(self, stop: asyncio.Event) -> None:
        await self.ensure_groups()
        while not stop.is_set():
            await self._slots.acquire()
            free = 1
            while free < self.concurrency and not self._slots.locked():
                await self._slots.acquire()
                free += 1
            try:
                reply: Any = await self.redis.xreadgroup(
                    WORKER_GROUP,
                    self.name,
                    dict.fromkeys(self.streams, ">"),
                    count=free,
                    block=500,
                )
            except BaseException:
                for _ in range(free):
                    self._slots.release()
                raise
            started = 0
            for stream, entries in reply or []:
                for entry_id, fields in entries:
                    if started >= free:
                        # COUNT is per stream: up to `free` entries from *each* stream can come
                        # back. Every running job must hold a slot (it releases one when done),
                        # or the semaphore grows past `concurrency` without bound.
                        await self._slots.acquire()
                    self._start(_s(stream), _s(entry_id), fields)
                    started += 1
            for _ in range(free - started):
                self._slots.release()

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        """Take over entries another worker got and never acknowledged (it crashed)."""
        idle_ms = int(self.settings.claim_idle_s * 1000)
        interval = max(0.5, min(5.0, self.settings.claim_idle_s / 2))
        while not stop.is_set():
            await _sleep_or_stop(stop, interval)
            for stream in self.streams:
                start = "0-0"
                while not stop.is_set():
                    reply = await self.redis.xautoclaim(
                        stream, WORKER_GROUP, self.name, idle_ms, start_id=start, count=50
                    )
                    # Redis 6.2 answers [next, entries]; 7.x adds a third item (deleted ids).
                    start, entries = _s(reply[0]), reply[1]
                    for entry in entries:
                        if not entry or entry[1] is None:
                            continue  # trimmed away meanwhile (6.2 shows such entries as nil)
                        entry_id, fields = entry
                        log.info("worker.claimed", stream=stream, entry=_s(entry_id))
                        await self._slots.acquire()
                        self._start(stream, _s(entry_id), fields)
                    if start == "0-0":
                        break

    async def _schedule_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            moved = await self._move_due(keys=[RETRY_SCHEDULE], args=[time.time(), 100])
            if not moved:
                await _sleep_or_stop(stop, 0.1)

    async def _trim_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await _sleep_or_stop(stop, 30.0)
            for stream in self.streams:
                await trim_acknowledged(self.redis, stream)

    # ------------------------------------------------------------------ one job

    def _start(self, stream: str, entry_id: str, raw: dict[Any, Any]) -> None:
        fields = {_s(k): _s(v) for k, v in raw.items()}
        task = asyncio.create_task(self._process_safely(stream, entry_id, fields))
        self._inflight[task] = (stream, entry_id, fields)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task, None)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("worker.job_crashed", error=repr(task.exception()))

    async def _process_safely(self, stream: str, entry_id: str, fields: dict[str, str]) -> None:
        """``_process``, and when the database or Redis fails around the partner call (reading
        the job, recording its outcome), try again in a few seconds without spending an
        attempt. Should even that fail, the entry stays pending and ``XAUTOCLAIM`` brings it
        back after ``claim_idle_s``: it is never lost."""
        try:
            await self._process(stream, entry_id, fields)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("job.infrastructure_error", entry=entry_id, stream=stream, error=repr(exc))
            with contextlib.suppress(Exception):
                await self._reschedule(stream, entry_id, fields, 2.0 + self.rng.uniform(0, 1))

    async def _process(self, stream: str, entry_id: str, fields: dict[str, str]) -> None:
        kind = IntegrationKind(fields["kind"])
        job_id = int(fields["job_id"])
        job = await self.store.job(job_id)
        if job is None:
            log.warning("job.missing", job_id=job_id, stream=stream)
            await self.store.ack(stream, entry_id)
            return
        if job.status in (IntegrationStatus.SUCCEEDED, IntegrationStatus.DEAD):
            self._count(kind, "duplicate")
            await self.store.ack(stream, entry_id)
            return
        breaker = self.breakers[PARTNER_OF[kind]]
        if not breaker.allow():
            # The partner is known to be down: wait for the breaker without using an attempt.
            await self._reschedule(stream, entry_id, fields, breaker.wait_s())
            self._count(kind, "breaker_open")
            return
        handler = HANDLERS[kind]
        try:
            external_ref = await handler(self.store, self.clients, job)
        except PermanentError as exc:
            breaker.success()  # the partner answered: it is up, the request is wrong
            await self._dead(stream, entry_id, fields, job, str(exc))
            return
        except NotConfiguredError as exc:
            breaker.release_probe()
            await self._failed(stream, entry_id, fields, job, str(exc), None)
            return
        except RetryableError as exc:
            breaker.failure()
            await self._failed(stream, entry_id, fields, job, str(exc), exc.retry_after)
            return
        except Exception as exc:
            breaker.release_probe()
            log.exception("job.handler_error", job_id=job_id, kind=kind.value)
            await self._failed(stream, entry_id, fields, job, f"{type(exc).__name__}: {exc}", None)
            return
        breaker.success()
        await self.store.succeeded(job_id, external_ref)
        await self.store.ack(stream, entry_id)
        self._count(kind, "succeeded")
        log.info("job.succeeded", job_id=job_id, kind=kind.value, external_ref=external_ref)

    async def _failed(
        self,
        stream: str,
        entry_id: str,
        fields: dict[str, str],
        job: Any,
        error: str,
        retry_after: float | None,
    ) -> None:
        kind = IntegrationKind(fields["kind"])
        attempt = int(job.attempts) + 1
        if attempt >= self.settings.max_attempts:
            await self._dead(stream, entry_id, fields, job, error)
            return
        delay = backoff_delay(
            attempt, self.settings.backoff_base_s, self.settings.backoff_max_s, self.rng
        )
        if retry_after is not None:
            delay = max(delay, retry_after)
        due = datetime.now(UTC) + timedelta(seconds=delay)
        async with self.db.reader("primary").connect() as conn:  # autocommit: 1 round trip
            await repo.finish_attempt(
                conn, job.id, IntegrationStatus.FAILED, error=error, next_attempt_at=due
            )
        await self._reschedule(stream, entry_id, fields, delay, attempt)
        self._count(kind, "retry")
        log.warning(
            "job.failed", job_id=job.id, kind=kind.value, attempt=attempt, error=error,
            retry_in_s=round(delay, 3),
        )  # fmt: skip

    async def _dead(
        self, stream: str, entry_id: str, fields: dict[str, str], job: Any, error: str
    ) -> None:
        kind = IntegrationKind(fields["kind"])
        async with self.db.reader("primary").connect() as conn:  # autocommit: 1 round trip
            updated = await repo.finish_attempt(conn, job.id, IntegrationStatus.DEAD, error=error)
        if updated is None:
            # Another delivery of this job succeeded meanwhile: nothing is dead.
            await self.redis.xack(stream, WORKER_GROUP, entry_id)
            self._count(kind, "duplicate")
            return
        pipe = self.redis.pipeline(transaction=True)
        dead: dict[Any, Any] = {**fields, "error": error[:1000]}
        pipe.xadd(DEAD_LETTER_STREAM, dead, maxlen=100_000)
        pipe.xack(stream, WORKER_GROUP, entry_id)
        await pipe.execute()
        self._count(kind, "dead")
        log.error("job.dead", job_id=job.id, kind=kind.value, error=error)

    async def _reschedule(
        self, stream: str, entry_id: str, fields: dict[str, str], delay: float, attempt: int = 0
    ) -> None:
        member = orjson.dumps(
            {"stream": stream, "job_id": fields["job_id"], "kind": fields["kind"],
             "key": fields.get("key", ""), "attempt": attempt, "from": entry_id}
        )  # fmt: skip
        pipe = self.redis.pipeline(transaction=True)
        pipe.zadd(RETRY_SCHEDULE, {member: time.time() + delay})
        pipe.xack(stream, WORKER_GROUP, entry_id)
        await pipe.execute()


async def enqueue(redis: Redis, job_id: int, kind: IntegrationKind, key: str) -> None:
    """Put a job on its stream (``retryIntegrationJob``)."""
    await redis.xadd(job_stream(kind), {"job_id": job_id, "kind": kind.value, "key": key})


async def trim_acknowledged(redis: Redis, stream: str) -> None:
    """Trim what every group has read and acknowledged, never an unacknowledged entry: the new
    first entry is the oldest pending one, or the first one a group has not read yet."""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:
        return
    if not groups:
        return
    floor: tuple[int, int] | None = None
    for group in groups:
        candidates = [_next_id(_s(group["last-delivered-id"]))]
        if int(group.get("pending", 0)):
            summary = await redis.xpending(stream, _s(group["name"]))
            if summary and summary.get("min"):
                candidates.append(_parse_id(_s(summary["min"])))
        lowest = min(candidates)
        floor = lowest if floor is None else min(floor, lowest)
    if floor is not None and floor > (0, 1):
        await redis.xtrim(stream, minid=f"{floor[0]}-{floor[1]}", approximate=False)


def all_job_streams() -> list[str]:
    return list(JOB_STREAMS.values())


def _parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _next_id(entry_id: str) -> tuple[int, int]:
    ms, seq = _parse_id(entry_id)
    return ms, seq + 1


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)

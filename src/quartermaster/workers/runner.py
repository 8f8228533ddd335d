"""One worker process: the outbox relay and/or the job consumers, plus their /metrics."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from redis.asyncio import Redis

from quartermaster.config import Settings
from quartermaster.db.engine import Database
from quartermaster.gc_policy import GcPolicy
from quartermaster.integrations.clients import build_clients
from quartermaster.observability import WorkerMetrics
from quartermaster.workers.consumer import Worker
from quartermaster.workers.monitor import JobTally, publish_report, snapshot, withdraw_report
from quartermaster.workers.relay import Relay

log = structlog.get_logger(__name__)

METRICS_REFRESH_S = 5.0
#: Every statement a worker runs looks rows up by key (``= ANY($1)`` over ids), the same
#: statements over and over. PostgreSQL keeps planning such statements afresh at every
#: execution (the generic plan of an array parameter looks dearer than the custom ones), which
#: cost more than executing them; the generic plan, made once per connection, is the same index
#: lookup.
WORKER_SERVER_SETTINGS = {"plan_cache_mode": "force_generic_plan"}


async def run_worker(
    settings: Settings,
    stop: asyncio.Event,
    *,
    concurrency: int | None = None,
    relay: bool = True,
    consume: bool = True,
    metrics_port: int | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Run until ``stop`` is set; in-flight jobs get the shutdown grace period."""
    if not settings.redis.url:
        raise RuntimeError("QM_REDIS_URL is not set")
    # QM_DB_PLAN_CACHE_MODE, when set, is the operator's choice for every process.
    extra = {} if settings.database.plan_cache_mode else WORKER_SERVER_SETTINGS
    db = Database.connect(settings.database, server_settings=extra)
    redis = Redis.from_url(settings.redis.url, health_check_interval=30)
    metrics = WorkerMetrics()
    clients = build_clients(settings.partners, on_call=metrics.on_partner_call)
    server: Any = None
    if metrics_port is not None:
        from prometheus_client import start_http_server

        server, _ = start_http_server(
            metrics_port, addr=settings.jobs.metrics_host, registry=metrics.registry
        )
    # Full collections walked every object the imports left (63-105 ms, every few seconds
    # under load, measured here); frozen, they walk what jobs left behind (5-17 ms).
    gc_policy = GcPolicy(settings.gc, metrics.registry)
    worker: Worker | None = None
    try:
        loops = []
        if relay:
            loops.append(Relay(db, redis, settings.jobs, metrics.relay_published.inc).run(stop))
        if consume:
            worker = Worker(
                db, redis, clients, settings.jobs, concurrency=concurrency, metrics=metrics
            )
            metrics.batches.source = lambda: worker.store.batchers if worker else {}
            loops.append(worker.run(stop))
        loops.append(_refresh_metrics(db, redis, metrics, worker, stop))
        log.info(
            "worker.started", relay=relay, consume=consume,
            concurrency=worker.concurrency if worker else 0, metrics_port=metrics_port,
        )  # fmt: skip
        if ready is not None:
            ready.set()
        gc_policy.start()
        await asyncio.gather(*loops)
    finally:
        await gc_policy.stop()
        if worker is not None:
            with contextlib.suppress(Exception):  # gone from the pipeline-wide figures at once
                await withdraw_report(redis, worker.name)
        await clients.aclose()
        await redis.aclose()
        await db.dispose()
        if server is not None:
            server.shutdown()
        log.info("worker.stopped")


async def _refresh_metrics(
    db: Database, redis: Redis, metrics: WorkerMetrics, worker: Worker | None, stop: asyncio.Event
) -> None:
    tally = JobTally()
    while not stop.is_set():
        if worker is not None:
            states = {p: int(b.state) for p, b in worker.breakers.items()}
            for partner, state in states.items():
                metrics.breaker.labels(partner).set(state)
            # What the API's (and the other workers') /metrics show of this worker's partners.
            try:
                await publish_report(redis, worker.name, metrics.report(states))
            except Exception as exc:  # the report is for metrics only
                log.debug("worker.report_failed", error=repr(exc))
        try:
            metrics.pipeline.update(await snapshot(db, redis, tally))
        except Exception as exc:  # metrics must never take the worker down
            log.debug("worker.metrics_error", error=repr(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), METRICS_REFRESH_S)

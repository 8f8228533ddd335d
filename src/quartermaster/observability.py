"""structlog JSON logs with a request id, and Prometheus metrics kept in app state."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from quartermaster.db.engine import Database, Role
from quartermaster.enums import IntegrationKind, IntegrationStatus

_OPERATION_NAME = re.compile(r"^[_A-Za-z][_0-9A-Za-z]{0,63}$")
MAX_OPERATION_LABELS = 500


def configure_logging(level: str = "info", json: bool = True) -> None:
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


class _PoolCollector(Collector):
    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Any:
        checked_out = GaugeMetricFamily(
            "qm_db_pool_checked_out", "Connections in use, per database", labels=["database"]
        )
        size = GaugeMetricFamily(
            "qm_db_pool_size", "Connections held by the pool, per database", labels=["database"]
        )
        engines = {"primary": self.db.primary}
        if self.db.units_of_work is not self.db.primary:
            engines["primary_writes"] = self.db.units_of_work  # the mutations' own pool
        if self.db.has_replica:
            engines["replica"] = self.db.replica
        for role, engine in engines.items():
            pool: Any = engine.pool
            checked_out.add_metric([role], float(pool.checkedout()))
            size.add_metric([role], float(pool.checkedin() + pool.checkedout()))
        yield checked_out
        yield size


class _ReplicaCollector(Collector):
    """Replica lag and where reads go, as the app's probe last saw them (``db/replica.py``)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Any:
        health = self.db.health
        target = GaugeMetricFamily(
            "qm_reads_target",
            "1 for the database that queries read from now (replica while healthy)",
            labels=["database"],
        )
        for name in ("primary", "replica"):
            target.add_metric([name], 1.0 if health.reads_target == name else 0.0)
        yield target
        if not self.db.has_replica:
            return
        yield GaugeMetricFamily(
            "qm_replica_lag_seconds", "Replica replay lag (seconds)", value=health.lag_seconds
        )
        yield GaugeMetricFamily(
            "qm_replica_lag_bytes", "WAL bytes the replica has not replayed", value=health.lag_bytes
        )
        yield GaugeMetricFamily(
            "qm_replica_healthy",
            "1 while the replica answers and lags at most QM_REPLICA_MAX_LAG_S",
            value=1.0 if health.healthy else 0.0,
        )
        fallbacks = CounterMetricFamily(
            "qm_replica_read_fallbacks",
            "Replica reads retried on the primary, by cause",
            labels=["cause"],
        )
        for cause, n in health.fallbacks.items():
            fallbacks.add_metric([cause], float(n))
        yield fallbacks


class Metrics:
    """All metrics of one app instance, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "qm_graphql_operations_total",
            "GraphQL operations by name, type and outcome",
            ["operation", "type", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "qm_graphql_operation_seconds",
            "GraphQL operation latency by name and type",
            ["operation", "type"],
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.http = Counter(
            "qm_http_requests_total",
            "HTTP requests by path and status",
            ["path", "status"],
            registry=self.registry,
        )
        self.statements = Counter(
            "qm_sql_statements_total",
            "SQL statements sent, per database",
            ["database"],
            registry=self.registry,
        )
        self._names: set[str] = set()
        #: Integration pipeline gauges; /metrics refreshes them (at most every few seconds).
        self.pipeline = PipelineMetrics(self.registry)

    def bind_database(self, db: Database) -> None:
        self.registry.register(_PoolCollector(db))
        self.registry.register(_ReplicaCollector(db))

        def count(role: Role) -> None:
            self.statements.labels(role).inc()

        db.hooks.append(count)

    def _label(self, name: str | None) -> str:
        if not name:
            return "anonymous"
        if not _OPERATION_NAME.match(name):
            return "invalid"
        if name not in self._names:
            if len(self._names) >= MAX_OPERATION_LABELS:
                return "other"
            self._names.add(name)
        return name

    def observe_operation(
        self, name: str | None, op_type: str, outcome: str, seconds: float
    ) -> None:
        label = self._label(name)
        self.requests.labels(label, op_type, outcome).inc()
        self.latency.labels(label, op_type).observe(seconds)


class PipelineMetrics:
    """Gauges of the integration pipeline, refreshed from a ``PipelineSnapshot`` (taken at most
    every few seconds, when /metrics is scraped) plus the worker's own counters."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Gauge(
            "qm_integration_jobs",
            "Integration jobs by kind and status",
            ["kind", "status"],
            registry=registry,
        )
        self.outbox_unpublished = Gauge(
            "qm_outbox_unpublished", "Outbox rows not yet relayed to Redis", registry=registry
        )
        self.stream_length = Gauge(
            "qm_stream_length", "Entries in a Redis stream", ["stream"], registry=registry
        )
        self.pending = Gauge(
            "qm_stream_pending",
            "Entries delivered to a group and not acknowledged",
            ["stream", "group"],
            registry=registry,
        )
        self.lag = Gauge(
            "qm_stream_lag",
            "Entries a consumer group has not read yet",
            ["stream", "group"],
            registry=registry,
        )
        self.retries = Gauge(
            "qm_jobs_retry_scheduled", "Jobs waiting for their next attempt", registry=registry
        )
        self.redis_up = Gauge(
            "qm_redis_up", "1 when Redis answered the last scrape", registry=registry
        )
        self.workers = Gauge(
            "qm_workers_reporting", "Worker processes that reported lately", registry=registry
        )
        self.worker_breaker = Gauge(
            "qm_worker_partner_breaker_state",
            "Circuit breaker per worker and partner, as the worker last reported it: 0 closed, "
            "1 half-open, 2 open",
            ["worker", "partner"],
            registry=registry,
        )
        self.worker_calls = Gauge(
            "qm_worker_partner_requests",
            "Partner API calls per worker, partner and outcome since the worker started",
            ["worker", "partner", "outcome"],
            registry=registry,
        )
        self.worker_call_seconds = Gauge(
            "qm_worker_partner_request_seconds_sum",
            "Seconds spent in those partner calls (divide by qm_worker_partner_requests for the "
            "mean latency; each worker's own /metrics has the histogram)",
            ["worker", "partner", "outcome"],
            registry=registry,
        )
        self.taken_at = 0.0
        #: The label sets each labelled gauge shows now (by ``id`` of the gauge).
        self._shown: dict[int, set[tuple[str, ...]]] = {}

    def update(self, snap: Any) -> None:
        # Every kind and status is set, 0 when no job has it now: a status that empties must
        # not keep its last count.
        for kind in IntegrationKind:
            for status in IntegrationStatus:
                self.jobs.labels(kind.value, status.value).set(
                    snap.jobs.get((kind.value, status.value), 0)
                )
        self.outbox_unpublished.set(snap.outbox_unpublished)
        self.retries.set(snap.retries_scheduled)
        self.redis_up.set(1 if snap.redis_ok else 0)
        if not snap.redis_ok:
            return  # the stream figures keep their last values; qm_redis_up says they are old
        self._replace(self.stream_length, {(k,): v for k, v in snap.stream_length.items()})
        self._replace(self.pending, snap.group_pending)
        self._replace(self.lag, snap.group_lag)
        breakers: dict[tuple[str, ...], float] = {}
        calls: dict[tuple[str, ...], float] = {}
        seconds: dict[tuple[str, ...], float] = {}
        for worker, report in snap.workers.items():
            for partner, state in (report.get("breakers") or {}).items():
                breakers[(worker, str(partner))] = float(state)
            for c in report.get("calls") or []:
                labels = (worker, str(c["partner"]), str(c["outcome"]))
                calls[labels] = float(c["count"])
                seconds[labels] = float(c["seconds"])
        self.workers.set(len(snap.workers))
        self._replace(self.worker_breaker, breakers)
        self._replace(self.worker_calls, calls)
        self._replace(self.worker_call_seconds, seconds)

    def _replace(self, gauge: Gauge, values: dict[tuple[str, ...], Any]) -> None:
        """Set ``gauge`` to exactly ``values``: label sets that are gone (a group deleted, a
        Redis that lost its data) are removed instead of showing their last figure forever."""
        shown = self._shown.setdefault(id(gauge), set())
        for labels in shown - values.keys():
            gauge.remove(*labels)
        for labels, n in values.items():
            gauge.labels(*labels).set(n)
        self._shown[id(gauge)] = set(values)


class BatchMetrics(Collector):
    """The worker's shared statements (``workers/store.py``): flushes and items per batcher,
    read at scrape time; items / flushes is the mean batch size, the figure that says whether
    jobs share their round trips (it grows with ``--concurrency`` and with the load)."""

    def __init__(self) -> None:
        self.source: Callable[[], dict[str, Any]] | None = None

    def collect(self) -> Iterator[CounterMetricFamily]:
        flushes = CounterMetricFamily(
            "qm_worker_batch_flushes",
            "Statements (or XACKs) run for batched job requests",
            labels=["batch"],
        )
        items = CounterMetricFamily(
            "qm_worker_batch_items", "Job requests those statements served", labels=["batch"]
        )
        batchers = self.source() if self.source is not None else {}
        for name, batcher in sorted(batchers.items()):
            flushes.add_metric([name], batcher.flushes)
            items.add_metric([name], batcher.items)
        yield flushes
        yield items


class WorkerMetrics:
    """A worker process's registry: pipeline gauges, job outcomes, partner calls, breakers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.pipeline = PipelineMetrics(self.registry)
        self.jobs = Counter(
            "qm_jobs_processed_total",
            "Job deliveries handled, by kind and outcome",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.partner_latency = Histogram(
            "qm_partner_request_seconds",
            "Partner API call latency by partner and outcome",
            ["partner", "outcome"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.breaker = Gauge(
            "qm_partner_breaker_state",
            "Circuit breaker per partner: 0 closed, 1 half-open, 2 open",
            ["partner"],
            registry=self.registry,
        )
        self.relay_published = Counter(
            "qm_relay_published_total",
            "Outbox rows published by this process's relay",
            registry=self.registry,
        )

        self.batches = BatchMetrics()
        self.registry.register(self.batches)

    def on_partner_call(self, partner: str, seconds: float, outcome: str) -> None:
        self.partner_latency.labels(partner, outcome).observe(seconds)

    def report(self, breakers: dict[str, int]) -> dict[str, Any]:
        """What this worker publishes for the pipeline-wide /metrics (``monitor.py``): the
        breaker states and, from the latency histogram, calls and seconds per partner."""
        totals: dict[tuple[str, str], dict[str, float]] = {}
        for metric in self.partner_latency.collect():
            for sample in metric.samples:
                field = {"qm_partner_request_seconds_count": "count",
                         "qm_partner_request_seconds_sum": "seconds"}.get(sample.name)  # fmt: skip
                if field is not None:
                    key = (sample.labels["partner"], sample.labels["outcome"])
                    totals.setdefault(key, {})[field] = sample.value
        return {
            "breakers": breakers,
            "calls": [
                {"partner": partner, "outcome": outcome, "count": int(t.get("count", 0)),
                 "seconds": round(t.get("seconds", 0.0), 6)}
                for (partner, outcome), t in sorted(totals.items())
            ],
        }  # fmt: skip

"""structlog JSON logs with a request id, and Prometheus metrics kept in app state."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from quartermaster.db.engine import Database, Role

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
        if self.db.has_replica:
            engines["replica"] = self.db.replica
        for role, engine in engines.items():
            pool: Any = engine.pool
            checked_out.add_metric([role], float(pool.checkedout()))
            size.add_metric([role], float(pool.checkedin() + pool.checkedout()))
        yield checked_out
        yield size


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

    def bind_database(self, db: Database) -> None:
        self.registry.register(_PoolCollector(db))

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

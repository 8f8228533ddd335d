"""Engines for the primary and the replica, and the statement counter behind /metrics and tests.

Reads (queries, loaders) go through ``routed_reader(role)`` (``db/replica.py``): AUTOCOMMIT
connections, so a single SELECT costs one round trip instead of BEGIN / SELECT / ROLLBACK, on
the replica while the probe finds it healthy and on the primary otherwise or when a replica read
fails. Writes open their own transaction on ``primary``; workers read through ``reader(role)``.
"""

from __future__ import annotations

import contextvars
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from quartermaster.config import DatabaseSettings
from quartermaster.db.replica import ReplicaHealth, ReplicaMonitor, RoutedReader

Role = Literal["primary", "replica"]


@dataclass
class StatementStats:
    """SQL statements issued on behalf of one request (or one test block), per database."""

    by_role: Counter[str] = field(default_factory=Counter)
    statements: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.by_role.values())


#: Set per request (and by tests); the engine listener adds to whatever is current.
current_stats: contextvars.ContextVar[StatementStats | None] = contextvars.ContextVar(
    "qm_statement_stats", default=None
)

StatementHook = Callable[[Role], None]


def _make_engine(
    url: str, settings: DatabaseSettings, role: Role, server_settings: dict[str, str]
) -> AsyncEngine:
    mode = {"plan_cache_mode": settings.plan_cache_mode} if settings.plan_cache_mode else {}
    return create_async_engine(
        url,
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout,
        # asyncpg's pre-ping is BEGIN / ping / ROLLBACK: three round trips per checkout, and a
        # request checks out once per loader batch. Off by default; connections are recycled.
        pool_pre_ping=settings.pre_ping,
        pool_recycle=settings.pool_recycle_s,
        connect_args={
            "server_settings": {
                "application_name": f"quartermaster-{role}",
                "statement_timeout": str(settings.statement_timeout_ms),
                **mode,
                **server_settings,
            }
        },
    )


#: Units of work (mutations) look rows up by key (``= ANY($1)`` over ids), and PostgreSQL plans
#: such statements afresh at every execution (the generic plan of an array parameter looks
#: dearer than the custom ones): measured on ``placeOrder``, 360 + 174 µs of planning for its
#: two statements, per order. A generic plan is the same index lookup, made once per connection.
#: Query reads keep the server's choice: their filters can be skewed, where a custom plan wins.
WRITER_SERVER_SETTINGS = {"plan_cache_mode": "force_generic_plan"}


@dataclass
class Database:
    primary: AsyncEngine
    replica: AsyncEngine
    has_replica: bool
    #: Units of work: the primary, through connections of their own when their settings differ
    #: (``WRITER_SERVER_SETTINGS``); None means ``primary`` itself (``units_of_work``).
    writer: AsyncEngine | None = None
    hooks: list[StatementHook] = field(default_factory=list)
    #: Replica lag and reachability as last probed; decides where reads go.
    health: ReplicaHealth = field(default_factory=ReplicaHealth)
    #: The probe (started by the app's lifespan; workers never start it).
    monitor: ReplicaMonitor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.health.configured = self.has_replica
        self._autocommit = {
            "primary": self.primary.execution_options(isolation_level="AUTOCOMMIT"),
            "replica": self.replica.execution_options(isolation_level="AUTOCOMMIT"),
        }

    @classmethod
    def connect(
        cls,
        settings: DatabaseSettings,
        server_settings: dict[str, str] | None = None,
        writer_settings: dict[str, str] | None = None,
    ) -> Database:
        """Engines for ``settings``; ``server_settings`` are extra PostgreSQL settings for
        every connection (the worker's plan cache mode, say), ``writer_settings`` for the
        connections of units of work only (a pool of their own, ``writer``)."""
        if not settings.url:
            raise RuntimeError("QM_DATABASE_URL is not set")
        extra = server_settings or {}
        primary = _make_engine(settings.url, settings, "primary", extra)
        if settings.replica_url:
            replica = _make_engine(settings.replica_url, settings, "replica", extra)
        else:
            replica = primary
        writer = primary
        if writer_settings and not settings.plan_cache_mode:  # an operator's choice wins
            writer = _make_engine(settings.url, settings, "primary", extra | writer_settings)
        db = cls(
            primary=primary, replica=replica, has_replica=bool(settings.replica_url), writer=writer
        )
        db.monitor = ReplicaMonitor(db, settings)
        db._listen(primary, "primary")
        if writer is not primary:
            db._listen(writer, "primary")
        if replica is not primary:
            db._listen(replica, "replica")
        return db

    def _listen(self, engine: AsyncEngine, role: Role) -> None:
        def before_cursor_execute(*args: Any) -> None:
            stats = current_stats.get()
            if stats is not None:
                stats.by_role[role] += 1
                stats.statements.append(str(args[2]))
            for hook in self.hooks:
                hook(role)

        event.listen(engine.sync_engine, "before_cursor_execute", before_cursor_execute)

    @property
    def units_of_work(self) -> AsyncEngine:
        """Where mutations begin their transactions: the primary (``writer``'s pool)."""
        return self.writer if self.writer is not None else self.primary

    def reader(self, role: Role) -> AsyncEngine:
        """An autocommit engine view for reads through the given role (no fallback)."""
        return self._autocommit[role]

    def autocommit(self, role: Role) -> AsyncEngine:
        return self._autocommit[role]

    def routed_reader(self, role: Role) -> RoutedReader:
        """Request reads: ``replica`` means "the replica while it is healthy"."""
        return RoutedReader(self, role)

    def read_target(self, role: Role) -> Role:
        """The database that serves reads asked for ``role`` right now."""
        return (
            "replica" if role == "replica" and self.health.reads_target == "replica" else "primary"
        )

    def role_of(self, role: Role) -> Role:
        """The role that actually serves ``role`` (replica falls back to primary)."""
        return role if self.has_replica else "primary"

    async def dispose(self) -> None:
        if hasattr(self, "monitor"):
            await self.monitor.aclose()
        await self.primary.dispose()
        if self.units_of_work is not self.primary:
            await self.units_of_work.dispose()
        if self.replica is not self.primary:
            await self.replica.dispose()

"""Engines for the primary and the replica, and the statement counter behind /metrics and tests.

Reads (queries, loaders) go through ``reader(role)``: an AUTOCOMMIT view of the engine, so a
single SELECT costs one round trip instead of BEGIN / SELECT / ROLLBACK. Writes open their own
transaction on ``primary``.
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


def _make_engine(url: str, settings: DatabaseSettings, role: Role) -> AsyncEngine:
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
            }
        },
    )


@dataclass
class Database:
    primary: AsyncEngine
    replica: AsyncEngine
    has_replica: bool
    hooks: list[StatementHook] = field(default_factory=list)

    @classmethod
    def connect(cls, settings: DatabaseSettings) -> Database:
        if not settings.url:
            raise RuntimeError("QM_DATABASE_URL is not set")
        primary = _make_engine(settings.url, settings, "primary")
        if settings.replica_url:
            replica = _make_engine(settings.replica_url, settings, "replica")
        else:
            replica = primary
        db = cls(primary=primary, replica=replica, has_replica=bool(settings.replica_url))
        db._listen(primary, "primary")
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

    def reader(self, role: Role) -> AsyncEngine:
        """An autocommit engine view for reads through the given role."""
        engine = self.primary if role == "primary" else self.replica
        return engine.execution_options(isolation_level="AUTOCOMMIT")

    def role_of(self, role: Role) -> Role:
        """The role that actually serves ``role`` (replica falls back to primary)."""
        return role if self.has_replica else "primary"

    async def dispose(self) -> None:
        await self.primary.dispose()
        if self.replica is not self.primary:
            await self.replica.dispose()

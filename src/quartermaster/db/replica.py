"""The read replica: consistency tokens, the health probe (lag guard) and the read path that
falls back to the primary.

- **Consistency tokens.** After a mutation the server reads ``pg_current_wal_insert_lsn()`` on
  the primary; that WAL position is at or past every commit record the mutation wrote. A query that
  sends it back reads from the replica only once the replica has replayed that far.
- **The probe** (one per app) measures the replica's lag every ``replica_probe_s`` and keeps a
  breaker-like state: reads go to the replica while it answers and lags at most
  ``replica_max_lag_s``, else to the primary, until a later round finds it healthy again.
  Requests never check the lag themselves.
- **The read path.** Every request read goes through ``RoutedReader.connect()``. A read the
  replica cancels (recovery conflict, SQLSTATE 40001/40P01) or cannot serve (connection lost,
  refused, shutting down) runs again on the primary; a connection failure also opens the breaker
  at once, so the next requests do not try the broken replica before the probe has seen it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import deque
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self

import structlog
from sqlalchemy import text
from sqlalchemy.engine import Result
from sqlalchemy.exc import DBAPIError, InterfaceError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql import Executable

if TYPE_CHECKING:
    from quartermaster.config import DatabaseSettings
    from quartermaster.db.engine import Database

log = structlog.get_logger(__name__)

Target = Literal["primary", "replica"]

# --- consistency tokens ----------------------------------------------------------------------

TOKEN_HEADER = "X-Consistency-Token"
_TOKEN = re.compile(r"^qm1\.([0-9a-f]{16})$")
_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


class InvalidConsistencyToken(ValueError):
    """A consistency token that this server did not hand out."""


def encode_token(lsn: int) -> str:
    """``qm1.`` + the WAL position as 16 hex digits: opaque to clients, cheap to check."""
    return f"qm1.{lsn:016x}"


def decode_token(token: str) -> int:
    match = _TOKEN.match(token.strip())
    if match is None:
        raise InvalidConsistencyToken(
            "X-Consistency-Token is malformed: send back the value of a mutation response's "
            "X-Consistency-Token header (or extensions.consistencyToken) unchanged."
        )
    return int(match.group(1), 16)


def parse_lsn(value: str) -> int:
    """PostgreSQL's ``pg_lsn`` text (``16/B374D848``) as an integer."""
    match = _LSN.match(value)
    if match is None:
        raise ValueError(f"not a WAL position: {value!r}")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def _lsn(value: object) -> int | None:
    return parse_lsn(str(value)) if value is not None else None


# --- health state ----------------------------------------------------------------------------


@dataclass
class ReplicaHealth:
    """What the probe last saw, and where reads go because of it."""

    configured: bool = False
    #: The breaker: False while the replica is down or lags more than the bound.
    healthy: bool = True
    reachable: bool = True
    lag_seconds: float = 0.0
    lag_bytes: int = 0
    #: The replica's replay position as last seen (by the probe or a token check).
    replay_lsn: int = 0
    primary_lsn: int = 0
    reason: str | None = None
    checked_at: float = 0.0
    #: Reads retried on the primary, by cause ("conflict", "connection").
    fallbacks: dict[str, int] = field(default_factory=lambda: {"conflict": 0, "connection": 0})

    @property
    def reads_target(self) -> Target:
        return "replica" if self.configured and self.healthy else "primary"

    def describe(self) -> dict[str, Any]:
        """For /health/ready."""
        body: dict[str, Any] = {"target": self.reads_target}
        if self.configured:
            body.update(
                replicaHealthy=self.healthy,
                replicaLagSeconds=round(self.lag_seconds, 3),
                replicaLagBytes=self.lag_bytes,
            )
            if self.reason:
                body["reason"] = self.reason
        return body

    def open_breaker(self, reason: str) -> None:
        if self.healthy:
            log.warning("replica.unhealthy", reason=reason)
        self.healthy = False
        self.reason = reason


# --- what counts as "the replica could not serve this read" ----------------------------------

_CONFLICT_STATES = frozenset({"40001", "40P01"})  # canceled by a conflict with recovery


def replica_failure(exc: BaseException) -> Literal["conflict", "connection"] | None:
    """Why a read on the replica failed, when running it on the primary is the cure."""
    if isinstance(exc, DBAPIError):
        state = getattr(exc.orig, "sqlstate", None)
        if isinstance(state, str):
            if state in _CONFLICT_STATES:
                return "conflict"
            # 08: connection exceptions; 57P0x: shutdown, crash, "cannot connect now".
            if state.startswith(("08", "57P")):
                return "connection"
        if exc.connection_invalidated or isinstance(exc, InterfaceError):
            return "connection"
        return None
    if isinstance(exc, OSError | TimeoutError):  # refused, unreachable, connect timeout
        return "connection"
    return None


# --- the request read path -------------------------------------------------------------------


class ReadConnection(Protocol):
    async def execute(self, statement: Executable) -> Result[*tuple[Any, ...]]: ...


class ReadSource(Protocol):
    """What loaders and page fetches take: a ``RoutedReader`` (requests) or an engine."""

    def connect(self) -> AbstractAsyncContextManager[ReadConnection]: ...


class RoutedConnection:
    """One short autocommit connection for a read; opened on first ``execute``, on the role
    the request reads from, and on the primary when the replica cannot serve."""

    def __init__(self, db: Database, role: Target) -> None:
        self.db = db
        self.role = role
        self._conn: AsyncConnection | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._release()

    async def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # a dead connection is invalidated anyway
                await conn.close()

    async def execute(self, statement: Executable) -> Result[*tuple[Any, ...]]:
        if self._conn is None and self.db.read_target(self.role) == "replica":
            try:
                self._conn = await self.db.autocommit("replica").connect()
                return await self._conn.execute(statement)
            except Exception as exc:
                cause = replica_failure(exc)
                if cause is None:
                    raise
                await self._release()
                self.db.monitor.on_read_failure(cause, exc)
        if self._conn is None:
            self._conn = await self.db.autocommit("primary").connect()
        return await self._conn.execute(statement)


class RoutedReader:
    """What loaders and page fetches read through (``Context.reader``)."""

    def __init__(self, db: Database, role: Target) -> None:
        self.db = db
        self.role = role

    def connect(self) -> RoutedConnection:
        return RoutedConnection(self.db, self.role)


# --- the probe -------------------------------------------------------------------------------

_PRIMARY_SQL = text("SELECT pg_current_wal_lsn()::text")
# A server that is not in recovery (the replica URL points at a primary, or it was promoted)
# has nothing to replay: its own WAL position is its "replay" position.
_REPLICA_SQL = text(
    "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
    " ELSE pg_current_wal_lsn() END::text"
)


def _probe_engine(url: str, timeout_s: float) -> AsyncEngine:
    # Its own small pool: probing never waits behind request traffic, and its statements are
    # not counted as the requests' (no statement hooks on these engines).
    return create_async_engine(
        url,
        pool_size=1,
        max_overflow=4,
        pool_timeout=timeout_s,
        pool_pre_ping=False,
        connect_args={
            "timeout": timeout_s,
            "server_settings": {
                "application_name": "quartermaster-probe",
                "statement_timeout": str(int(timeout_s * 1000)),
            },
        },
    ).execution_options(isolation_level="AUTOCOMMIT")


class ReplicaMonitor:
    """The per-app probe task and the state it keeps in ``db.health``."""

    def __init__(self, db: Database, settings: DatabaseSettings) -> None:
        self.db = db
        self.health = db.health
        self.interval_s = max(0.05, settings.replica_probe_s)
        self.max_lag_s = settings.replica_max_lag_s
        self.timeout_s = max(0.5, min(2.0, self.interval_s * 2))
        self._urls = (settings.url, settings.replica_url)
        self._engines: tuple[AsyncEngine, AsyncEngine] | None = None
        self._task: asyncio.Task[None] | None = None
        self._asking: asyncio.Task[int] | None = None
        # (monotonic time, primary LSN) of recent rounds: how long the primary has been past
        # the replica's replay position is the lag in seconds, to the probe interval.
        span = int(max(self.max_lag_s, 1.0) * 4 / self.interval_s) + 2
        self._history: deque[tuple[float, int]] = deque(maxlen=min(span, 10_000))

    @property
    def engines(self) -> tuple[AsyncEngine, AsyncEngine]:
        if self._engines is None:
            primary_url, replica_url = self._urls
            assert primary_url and replica_url
            self._engines = (
                _probe_engine(primary_url, self.timeout_s),
                _probe_engine(replica_url, self.timeout_s),
            )
        return self._engines

    async def start(self) -> None:
        """Probe once (so the first requests already read from the right place), then keep
        probing in the background."""
        if not self.health.configured or self._task is not None:
            return
        await self.check()
        self._task = asyncio.create_task(self._run(), name="qm-replica-probe")

    async def aclose(self) -> None:
        for task in (self._task, self._asking):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._asking = None
        if self._engines is not None:
            for engine in self._engines:
                await engine.dispose()
            self._engines = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception as exc:  # the probe must never die
                log.error("replica.probe_failed", error=repr(exc))

    async def _scalar(self, engine: AsyncEngine, statement: Executable) -> Any:
        async with asyncio.timeout(self.timeout_s):
            async with engine.connect() as conn:
                return (await conn.execute(statement)).scalar()

    async def check(self) -> None:
        """One round: the primary's WAL position, then the replica's replay position."""
        primary, replica = self.engines
        health = self.health
        now = time.monotonic()
        primary_lsn: int | None = None
        try:
            primary_lsn = _lsn(await self._scalar(primary, _PRIMARY_SQL))
        except Exception as exc:
            # Without the primary there is no lag to measure; the replica still serves reads.
            log.warning("replica.probe_primary_failed", error=repr(exc))
        try:
            replay = _lsn(await self._scalar(replica, _REPLICA_SQL)) or 0
        except Exception as exc:
            health.reachable = False
            health.checked_at = now
            health.open_breaker(f"unreachable: {type(exc).__name__}")
            return
        health.reachable = True
        health.checked_at = now
        health.replay_lsn = max(health.replay_lsn, replay)
        if primary_lsn is not None:
            self._history.append((now, primary_lsn))
            health.primary_lsn = primary_lsn
            health.lag_bytes = max(0, primary_lsn - replay)
            health.lag_seconds = self._lag_seconds(now, replay, primary_lsn)
        if health.lag_seconds > self.max_lag_s:
            health.open_breaker(f"lag {health.lag_seconds:.1f} s > {self.max_lag_s} s")
        elif not health.healthy:
            log.info("replica.healthy", lag_seconds=round(health.lag_seconds, 3))
            health.healthy = True
            health.reason = None

    def _lag_seconds(self, now: float, replay: int, primary_lsn: int) -> float:
        if replay >= primary_lsn:
            return 0.0
        # The earliest round at which the primary was already past the replay position.
        for seen_at, lsn in self._history:
            if lsn > replay:
                return now - seen_at
        return 0.0

    async def replayed(self, lsn: int) -> bool:
        """Has the replica replayed up to ``lsn``? The probe's value answers when it is far
        enough; otherwise the replica is asked once (and that answer is kept). Requests that
        ask at the same time share one question: at most one is in flight per process."""
        if self.health.replay_lsn >= lsn:
            return True
        ask = self._asking
        if ask is None or ask.done():
            ask = self._asking = asyncio.create_task(self._ask_replay())
        return await asyncio.shield(ask) >= lsn

    async def _ask_replay(self) -> int:
        try:
            replay = _lsn(await self._scalar(self.engines[1], _REPLICA_SQL)) or 0
        except Exception as exc:
            log.warning("replica.replay_check_failed", error=repr(exc))
            return 0
        self.health.replay_lsn = max(self.health.replay_lsn, replay)
        return replay

    def on_read_failure(self, cause: Literal["conflict", "connection"], exc: Exception) -> None:
        self.health.fallbacks[cause] += 1
        log.warning("replica.read_retried_on_primary", cause=cause, error=repr(exc))
        if cause == "connection":
            self.health.open_breaker(f"read failed: {type(exc).__name__}")


# The insert position, not the write position: with synchronous_commit=off a commit record can
# still sit in the WAL buffers (inserted, not yet written) when the transaction returns.
_TOKEN_SQL = text("SELECT pg_current_wal_insert_lsn()::text")


async def current_wal_lsn(db: Database) -> int:
    """The primary's WAL position now: after a commit, at or past its commit record."""
    async with db.autocommit("primary").connect() as conn:
        return parse_lsn((await conn.execute(_TOKEN_SQL)).scalar_one())


async def wal_lsn_after_commit(conn: AsyncConnection) -> int:
    """The WAL position read on ``conn`` right after it committed, before it goes back to the
    pool: one round trip on the driver connection (no BEGIN/ROLLBACK, no pool checkout), at or
    past the commit record just written."""
    from quartermaster.db.driver import driver_connection

    return parse_lsn(await (await driver_connection(conn)).fetchval(_TOKEN_SQL.text))

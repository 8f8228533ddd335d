"""Hot-path statements run on the driver (asyncpg) connection, inside the caller's transaction.

SQLAlchemy's execution path (statement cache, parameter processing, result metadata, the
greenlet hop of the asyncio adapter) costs about 90 µs of CPU per statement more than asyncpg
itself; on ``placeOrder``, whose whole transaction is three statements, that was a quarter of
the SQL time of a request. A ``DriverStatement`` is a ``text()`` statement compiled once for
asyncpg (``$n`` placeholders) and run with ``fetch`` on the connection the caller's unit of
work holds, in the same transaction: the caller still begins and commits through SQLAlchemy.

It keeps what the SQLAlchemy path gives: the statement is counted (``before_cursor_execute``
listeners: ``/metrics``, the per-request statement stats of the tests), errors come back as
``DBAPIError`` carrying the driver's exception (so deadlocks and serialization failures are
retried by the unit of work like any other), and a connection that broke is invalidated
rather than handed back to the pool.
"""

from __future__ import annotations

from typing import Any

from asyncpg.exceptions import PostgresError
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.selectable import TextualSelect

_DIALECT = PGDialect_asyncpg()


class DriverStatement:
    def __init__(self, statement: TextClause | TextualSelect) -> None:
        compiled = statement.compile(dialect=_DIALECT)
        self.sql = str(compiled)
        self.names: tuple[str, ...] = tuple(compiled.positiontup or ())

    async def fetch(self, conn: AsyncConnection, params: dict[str, Any]) -> list[Any]:
        """The rows (asyncpg records) of this statement, run in ``conn``'s transaction."""
        driver = await _driver_in_transaction(conn)
        args = [params[name] for name in self.names]
        sync = conn.sync_connection
        if sync is not None:
            sync.dispatch.before_cursor_execute(sync, None, self.sql, args, None, False)
        try:
            return list(await driver.fetch(self.sql, *args))
        except Exception as exc:
            if not _is_server_error(exc):
                await conn.invalidate()
            raise DBAPIError(self.sql, args, exc) from exc


async def driver_connection(conn: AsyncConnection) -> Any:
    """The asyncpg connection under ``conn``."""
    return (await conn.get_raw_connection()).driver_connection


async def _driver_in_transaction(conn: AsyncConnection) -> Any:
    """The asyncpg connection under ``conn``, with the transaction SQLAlchemy began on it
    started (the adapter starts it lazily, at its first statement)."""
    if not conn.in_transaction():
        raise RuntimeError("DriverStatement runs inside a transaction begun on the connection")
    raw = await conn.get_raw_connection()
    adapter: Any = raw.dbapi_connection
    driver: Any = raw.driver_connection
    if not driver.is_in_transaction():
        await adapter._start_transaction()
    if not driver.is_in_transaction():  # pragma: no cover - a SQLAlchemy change
        raise RuntimeError("could not start the transaction on the driver connection")
    return driver


def _is_server_error(exc: Exception) -> bool:
    """An error the server reported (the connection is fine), not a broken connection."""
    return isinstance(exc, PostgresError)

"""Helpers shared by mutation resolvers: the unit of work, id decoding and UserError mapping."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from quartermaster.context import Context
from quartermaster.db.replica import wal_lsn_after_commit
from quartermaster.db.repositories.rows import fetch_row, row_visible
from quartermaster.errors import InvalidIdError
from quartermaster.schema.errors import UserError, UserErrorCode
from quartermaster.schema.node import decode_id
from quartermaster.schema.registry import ROW_TYPES
from quartermaster.services.errors import Problem, ProblemsError

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: deadlock_detected, serialization_failure: the transaction is retried, never reported.
RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})
MAX_ATTEMPTS = 5


def to_user_errors(problems: list[Problem]) -> list[UserError]:
    return [
        UserError(
            code=UserErrorCode[p.code],
            message=p.message,
            field=list(p.field) if p.field is not None else None,
        )
        for p in problems
    ]


def input_id(global_id: str, expected: str, *field: str) -> int:
    """Decode an id from a mutation input; a bad one becomes an INVALID_INPUT UserError."""
    return input_ids([(global_id, expected, tuple(field))])[0]


def input_ids(items: Sequence[tuple[str, str, tuple[str, ...]]]) -> list[int]:
    """Decode several ids, reporting every bad one (``(global id, type, field path)``)."""
    decoded: list[int] = []
    problems: list[Problem] = []
    for global_id, expected, field in items:
        try:
            decoded.append(decode_id(global_id, expected, ".".join(field)))
        except InvalidIdError as exc:
            problems.append(Problem("INVALID_INPUT", exc.message, field))
    if problems:
        raise ProblemsError(problems)
    return decoded


def _sqlstate(exc: DBAPIError) -> str | None:
    state = getattr(exc.orig, "sqlstate", None)
    return state if isinstance(state, str) else None


async def run_unit_of_work(context: Context, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """Run ``work`` in one transaction on the primary and commit once.

    Deadlocks and serialization failures roll back and run again (jittered backoff), so they
    never reach the client. After the commit the request's loaders start afresh, so the payload
    shows the rows as committed.
    """
    context.use_primary()
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            async with context.db.units_of_work.connect() as conn:
                async with conn.begin():
                    result = await work(conn)
                await _note_commit(context, conn)
        except DBAPIError as exc:
            state = _sqlstate(exc)
            if state not in RETRYABLE_SQLSTATES or attempt == MAX_ATTEMPTS:
                raise
            log.warning("unit_of_work.retry", sqlstate=state, attempt=attempt)
            await asyncio.sleep(random.uniform(0, 0.005 * 2**attempt))
            continue
        context.reset_loaders()
        return result
    raise AssertionError("unreachable")  # pragma: no cover


async def _note_commit(context: Context, conn: AsyncConnection) -> None:
    """Remember the WAL position of this commit for the response's consistency token
    (``schema/extensions.py``), read on the same connection before it goes back to the pool.
    The writes are committed whatever happens here; without a position the extension asks the
    primary afterwards."""
    try:
        lsn = await wal_lsn_after_commit(conn)
    except Exception as exc:
        log.warning("consistency_token.unavailable", error=repr(exc))
        return
    context.commit_lsn = lsn if context.commit_lsn is None else max(context.commit_lsn, lsn)


async def write_then_read(
    context: Context, work: Callable[[AsyncConnection], Awaitable[Any]], table: str
) -> Any:
    """Run ``work`` in a unit of work; it returns the payload's root row (as its write
    returned it) or just its primary key, and then the row is read in the same transaction.
    Either way the payload answers with the state this mutation made, even when another
    transaction changes the row right after the commit. Nested fields are read through fresh
    loaders on the primary after the commit."""

    async def unit(conn: AsyncConnection) -> Any:
        result = await work(conn)
        row = await fetch_row(conn, table, result) if isinstance(result, int) else result
        return ROW_TYPES[table](row)

    return await run_unit_of_work(context, unit)


async def transition(
    context: Context,
    global_id: str,
    type_name: str,
    table: str,
    work: Callable[[AsyncConnection, int], Awaitable[None]],
) -> Any:
    """A state change of one object: decode its id (field ``<type>Id``), run ``work`` on it,
    and return the object as this transaction left it."""
    field = type_name[0].lower() + type_name[1:] + "Id"
    pk = input_id(global_id, type_name, field)

    async def unit(conn: AsyncConnection) -> int:
        await require_visible(context, conn, table, pk, field)
        await work(conn, pk)
        return pk

    return await write_then_read(context, unit, table)


async def require_visible(
    context: Context, conn: AsyncConnection, table: str, pk: int, field: str
) -> None:
    """NOT_FOUND unless the caller may read row ``pk`` of ``table`` (``policy.scope``): a
    customer touching someone else's quotation learns nothing, not even that it exists.
    Staff need no query."""
    if context.principal.is_staff:
        return
    if not await row_visible(conn, table, pk, context.scope):
        raise ProblemsError([Problem("NOT_FOUND", "No such object.", (field,))])


def line_product_ids(lines: Sequence[Any]) -> list[int]:
    """The product ids of ``lines`` (inputs with ``product_id``), every bad one reported."""
    return input_ids(
        [
            (line.product_id, "Product", ("lines", str(i), "productId"))
            for i, line in enumerate(lines)
        ]
    )

"""The transactional outbox: rows written in the business transaction, relayed after commit."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Table, insert
from sqlalchemy.ext.asyncio import AsyncConnection

from quartermaster.db.models import OutboxEvent

outbox = cast(Table, OutboxEvent.__table__)


async def add_events(conn: AsyncConnection, events: list[dict[str, Any]]) -> None:
    """``events``: dicts with ``topic``, ``key`` and a JSON-able ``payload``."""
    if events:
        await conn.execute(insert(outbox), events)

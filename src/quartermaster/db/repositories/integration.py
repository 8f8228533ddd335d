"""SQL of the integration pipeline: outbox claiming, job rows and what job handlers read."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, func, text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from quartermaster.db.models import IntegrationJob
from quartermaster.enums import IntegrationStatus

integration_jobs = cast(Table, IntegrationJob.__table__)
_RETRYABLE = (IntegrationStatus.FAILED, IntegrationStatus.DEAD)

# Every committed, unpublished row, oldest id first. That keeps the order that matters, per
# stock level and per order: transactions touching the same level (or order) are serialised by
# its row lock, and the later one draws its outbox ids only after the earlier one committed, so
# of one level's rows the relay always sees a prefix, in id order. Across unrelated
# transactions ids are not commit order, and nothing downstream relies on that. (An earlier
# version only took rows whose ``txid`` was below the snapshot's xmin; that admitted a waiting
# transaction's rows, whose xid was older, ahead of those of the transaction it had waited
# for, and broke the per-level order.)
_CLAIM_SQL = text(
    """
SELECT id, topic, key, payload, created_at FROM outbox
WHERE published_at IS NULL
ORDER BY id
LIMIT :limit
FOR UPDATE SKIP LOCKED
"""
)


async def claim_outbox_batch(conn: AsyncConnection, limit: int) -> list[Row[Any]]:
    return list((await conn.execute(_CLAIM_SQL, {"limit": limit})).all())


async def mark_published(conn: AsyncConnection, ids: Sequence[int]) -> None:
    await conn.execute(
        text("UPDATE outbox SET published_at = now() WHERE id = ANY(:ids)"), {"ids": list(ids)}
    )


async def published_since(
    conn: AsyncConnection, since: datetime, after_id: int, limit: int
) -> list[Row[Any]]:
    """Published rows (oldest first) for ``outbox replay``."""
    return list(
        (
            await conn.execute(
                text(
                    "SELECT id, topic, key, payload, created_at FROM outbox "
                    "WHERE published_at IS NOT NULL AND created_at >= :since AND id > :after "
                    "ORDER BY id LIMIT :limit"
                ),
                {"since": since, "after": after_id, "limit": limit},
            )
        ).all()
    )


async def delete_published_before(conn: AsyncConnection, cutoff: datetime, limit: int) -> int:
    result = await conn.execute(
        text(
            "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox "
            "WHERE published_at < :cutoff ORDER BY published_at LIMIT :limit)"
        ),
        {"cutoff": cutoff, "limit": limit},
    )
    return int(getattr(result, "rowcount", 0) or 0)


# A job that exists already (a relay repeating itself, a replay) comes back as it is, so the
# caller sees its status and does not enqueue a job that is done.
_UPSERT_JOBS_SQL = text(
    """
INSERT INTO integration_jobs (kind, status, order_id, product_id, idempotency_key, payload,
                              outbox_id, attempts)
SELECT j.kind, 'PENDING', j.order_id, j.product_id, j.key, j.payload,
       j.outbox_id, 0
FROM unnest(CAST(:kinds AS text[]), CAST(:order_ids AS bigint[]), CAST(:product_ids AS bigint[]),
            CAST(:keys AS text[]), CAST(:payloads AS jsonb[]), CAST(:outbox_ids AS bigint[]))
     AS j(kind, order_id, product_id, key, payload, outbox_id)
ON CONFLICT (idempotency_key) DO UPDATE SET idempotency_key = EXCLUDED.idempotency_key
RETURNING id, kind, status, idempotency_key
"""
)


async def upsert_jobs(conn: AsyncConnection, jobs: Sequence[dict[str, Any]]) -> list[Row[Any]]:
    """``jobs``: dicts with kind, order_id, product_id, key, payload (JSON text), outbox_id."""
    if not jobs:
        return []
    params = {
        "kinds": [j["kind"] for j in jobs],
        "order_ids": [j["order_id"] for j in jobs],
        "product_ids": [j["product_id"] for j in jobs],
        "keys": [j["key"] for j in jobs],
        "payloads": [j["payload"] for j in jobs],
        "outbox_ids": [j["outbox_id"] for j in jobs],
    }
    return list((await conn.execute(_UPSERT_JOBS_SQL, params)).all())


async def jobs_by_ids(conn: AsyncConnection, ids: Sequence[int]) -> list[Row[Any]]:
    if not ids:
        return []
    return list(
        (
            await conn.execute(
                text(
                    "SELECT id, kind, status, idempotency_key FROM integration_jobs "
                    "WHERE id = ANY(:ids) ORDER BY id"
                ),
                {"ids": list(ids)},
            )
        ).all()
    )


async def lock_job(conn: AsyncConnection, job_id: int) -> Row[Any] | None:
    return (
        await conn.execute(
            integration_jobs.select().where(integration_jobs.c.id == job_id).with_for_update()
        )
    ).one_or_none()


async def finish_attempt(
    conn: AsyncConnection,
    job_id: int,
    status: IntegrationStatus,
    *,
    error: str | None = None,
    external_ref: str | None = None,
    next_attempt_at: datetime | None = None,
) -> Row[Any] | None:
    """Record one attempt. A job that succeeded stays SUCCEEDED (a late duplicate changes
    nothing); returns the updated row, or None when the job was already done."""
    return (
        await conn.execute(
            text(
                """
UPDATE integration_jobs
SET status = :status, attempts = attempts + 1,
    last_error = :error, external_ref = coalesce(:external_ref, external_ref),
    next_attempt_at = :next_attempt_at, updated_at = now()
WHERE id = :id AND status <> 'SUCCEEDED'
RETURNING id, status, attempts
"""
            ),
            {
                "id": job_id,
                "status": status.value,
                "error": error[:2000] if error else None,
                "external_ref": external_ref,
                "next_attempt_at": next_attempt_at,
            },
        )
    ).one_or_none()


async def revive_job(conn: AsyncConnection, job_id: int) -> Row[Any] | None:
    """FAILED/DEAD → PENDING (``retryIntegrationJob``); None when the job is in another state."""
    return (
        await conn.execute(
            integration_jobs.update()
            .where(integration_jobs.c.id == job_id)
            .where(integration_jobs.c.status.in_(_RETRYABLE))
            .values(
                status=IntegrationStatus.PENDING,
                attempts=0,
                next_attempt_at=None,
                updated_at=func.now(),
            )
            .returning(*integration_jobs.c)
        )
    ).one_or_none()


async def count_by_status(conn: AsyncConnection) -> dict[tuple[str, str], int]:
    """Every job counted (a scan of the whole table: tests and recounts, not every scrape)."""
    rows = await conn.execute(
        text("SELECT kind::text, status::text, count(*) FROM integration_jobs GROUP BY 1, 2")
    )
    return {(r[0], r[1]): int(r[2]) for r in rows}


# In one statement (one snapshot): per kind, the jobs above ``w`` (and those up to ``w2`` of
# them, with the highest id), and the jobs that are not SUCCEEDED, by status.
_TALLY_SQL = text(
    """
SELECT kind::text, NULL AS status, count(*) FILTER (WHERE id <= :w2) AS settled, count(*),
       max(id)
FROM integration_jobs WHERE id > :w GROUP BY kind
UNION ALL
SELECT kind::text, status::text, NULL, count(*), NULL
FROM integration_jobs WHERE status IN ('PENDING', 'FAILED', 'DEAD') GROUP BY kind, status
"""
)


async def highest_job_id_before(conn: AsyncConnection, seconds_ago: float) -> int:
    """The highest id of the jobs created at least ``seconds_ago`` (0 when none): a scan of
    the table, for ``JobTally``'s start (and recounts) only."""
    value = (
        await conn.execute(
            text(
                "SELECT max(id) FROM integration_jobs "
                "WHERE created_at <= now() - make_interval(secs => :s)"
            ),
            {"s": seconds_ago},
        )
    ).scalar_one()
    return int(value or 0)


async def tally_rows(conn: AsyncConnection, above: int, settle_to: int) -> list[Row[Any]]:
    """The rows of ``_TALLY_SQL`` (``workers/monitor.py`` ``JobTally``)."""
    return list((await conn.execute(_TALLY_SQL, {"w": above, "w2": settle_to})).all())


# --- the worker's batched reads and writes (``workers/store.py``) ----------------------------


async def jobs_by_id(conn: AsyncConnection, ids: Sequence[int]) -> dict[int, Row[Any]]:
    """Whole job rows by id (the worker's read of every job a stream read started)."""
    if not ids:
        return {}
    rows = await conn.execute(
        integration_jobs.select().where(integration_jobs.c.id.in_(sorted(set(ids))))
    )
    return {int(r.id): r for r in rows}


# Generic plans (the worker's ``plan_cache_mode``, ``workers/runner.py``) hash a whole joined
# table when they can; scalar subqueries per row keep every lookup an index probe.
_INVOICE_DATA_SQL = text(
    """
SELECT o.id, o.number, o.customer_id, o.currency, o.total, o.status,
       (SELECT c.email FROM customers c WHERE c.id = o.customer_id) AS email,
       (SELECT c.name FROM customers c WHERE c.id = o.customer_id) AS customer_name,
       ol.id AS line_id, (SELECT p.sku FROM products p WHERE p.id = ol.product_id) AS sku,
       ol.quantity, ol.unit_price, ol.line_total
FROM orders o LEFT JOIN order_lines ol ON ol.order_id = o.id
WHERE o.id = ANY(:ids)
ORDER BY o.id, ol.id
"""
)


async def orders_for_invoice(
    conn: AsyncConnection, order_ids: Sequence[int]
) -> dict[int, tuple[Any, list[Any]]]:
    """The orders (with the customer's e-mail and name) and their lines with SKUs, for
    invoices and notifications, in one statement however many orders: a row per line, each
    carrying its order's columns too (so every row is also the order)."""
    ids = sorted(set(order_ids))
    if not ids:
        return {}
    found: dict[int, tuple[Any, list[Any]]] = {}
    for row in await conn.execute(_INVOICE_DATA_SQL, {"ids": ids}):
        _, lines = found.setdefault(int(row.id), (row, []))
        if row.line_id is not None:
            lines.append(row)
    return found


_SYNC_PRODUCTS_SQL = text(
    """
WITH wanted AS (
    SELECT l.order_id, l.product_id FROM order_lines l WHERE l.order_id = ANY(:order_ids)
    UNION
    SELECT NULL::bigint, x FROM unnest(CAST(:product_ids AS bigint[])) AS x
)
SELECT w.order_id, w.product_id AS id,
       (SELECT p.sku FROM products p WHERE p.id = w.product_id) AS sku,
       (SELECT coalesce(sum(s.on_hand - s.reserved), 0)::int FROM stock_levels s
        WHERE s.product_id = w.product_id) AS available
FROM wanted w
ORDER BY w.order_id NULLS FIRST, w.product_id
"""
)


async def products_to_sync(
    conn: AsyncConnection, order_ids: Sequence[int], product_ids: Sequence[int]
) -> tuple[dict[int, list[Any]], dict[int, Any]]:
    """(id, sku, available) of the distinct products of each order and of each listed product,
    in id order, in one statement; available = on hand minus reserved, all warehouses. A
    product that does not exist is left out."""
    orders = sorted(set(order_ids))
    products = sorted(set(product_ids))
    of_order: dict[int, list[Any]] = {}
    by_id: dict[int, Any] = {}
    if not orders and not products:
        return of_order, by_id
    params = {"order_ids": orders, "product_ids": products}
    for row in await conn.execute(_SYNC_PRODUCTS_SQL, params):
        if row.sku is None:
            continue
        if row.order_id is None:
            by_id[int(row.id)] = row
        else:
            of_order.setdefault(int(row.order_id), []).append(row)
    return of_order, by_id


_SUCCEEDED_SQL = text(
    """
UPDATE integration_jobs j
SET status = 'SUCCEEDED', attempts = j.attempts + 1, last_error = NULL,
    external_ref = coalesce(u.ref, j.external_ref), next_attempt_at = NULL, updated_at = now()
FROM unnest(CAST(:ids AS bigint[]), CAST(:refs AS text[])) AS u(id, ref)
WHERE j.id = u.id AND j.status <> 'SUCCEEDED'
"""
)


async def mark_succeeded(conn: AsyncConnection, outcomes: Sequence[tuple[int, str | None]]) -> None:
    """``finish_attempt(..., SUCCEEDED)`` for many jobs in one statement. A job listed twice
    (two deliveries that both succeeded) counts one attempt, as two separate calls would."""
    refs: dict[int, str | None] = {}
    for job_id, ref in outcomes:
        refs.setdefault(job_id, ref)
    if refs:
        await conn.execute(_SUCCEEDED_SQL, {"ids": list(refs), "refs": list(refs.values())})

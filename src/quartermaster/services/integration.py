"""Which outbox events cause which partner jobs, and the jobs' own state changes.

Every job has a stable idempotency key derived from the event that caused it, so a relay that
repeats itself (crash between XADD and marking published) or an ``outbox replay`` finds the job
that exists instead of making a second one; the key is also sent to the partner as
``Idempotency-Key``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection

from quartermaster.db.repositories import integration as repo
from quartermaster.db.repositories import outbox
from quartermaster.enums import IntegrationKind
from quartermaster.services.errors import Problem, ProblemsError


@dataclass(frozen=True)
class JobSpec:
    kind: IntegrationKind
    key: str
    order_id: int | None
    product_id: int | None
    outbox_id: int
    payload: dict[str, Any]

    def as_row(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "key": self.key,
            "order_id": self.order_id,
            "product_id": self.product_id,
            "outbox_id": self.outbox_id,
            "payload": orjson.dumps(self.payload).decode(),
        }


def jobs_for_event(outbox_id: int, topic: str, payload: dict[str, Any]) -> list[JobSpec]:
    """order.placed → INVOICE + NOTIFICATION; order.cancelled → NOTIFICATION + one SHOP_SYNC
    of the order's products; stock.changed → SHOP_SYNC.

    The stock changes an order makes for one reason (its reservations, its shipment) share one
    SHOP_SYNC of all the order's products; a change of no order (adjustStock) syncs its product;
    the RELEASE changes of a cancellation are covered by the cancellation's own SHOP_SYNC.
    """
    if topic == "order.placed":
        order_id = int(payload["order_id"])
        return [
            JobSpec(IntegrationKind.INVOICE, f"invoice:order:{order_id}", order_id, None,
                    outbox_id, {"event": topic}),
            JobSpec(IntegrationKind.NOTIFICATION, f"notify:order-placed:{order_id}", order_id,
                    None, outbox_id, {"event": topic, "template": "order-placed"}),
        ]  # fmt: skip
    if topic == "order.cancelled":
        order_id = int(payload["order_id"])
        return [
            JobSpec(IntegrationKind.NOTIFICATION, f"notify:order-cancelled:{order_id}", order_id,
                    None, outbox_id, {"event": topic, "template": "order-cancelled",
                                      "reason": payload.get("reason")}),
            JobSpec(IntegrationKind.SHOP_SYNC, f"shop-sync:order-cancelled:{order_id}", order_id,
                    None, outbox_id, {"event": topic}),
        ]  # fmt: skip
    if topic == "stock.changed":
        of_order: int | None = payload.get("order_id")
        reason = payload.get("reason")
        if of_order is None:
            product_id = int(payload["product_id"])
            return [
                JobSpec(IntegrationKind.SHOP_SYNC, f"shop-sync:stock:{outbox_id}", None,
                        product_id, outbox_id, {"event": topic, "reason": reason}),
            ]  # fmt: skip
        if reason == "RELEASE":
            return []  # the cancellation's own SHOP_SYNC covers these
        # Every change an order makes with one reason (its reservations, its shipment) is one
        # job that pushes all of the order's products.
        return [
            JobSpec(IntegrationKind.SHOP_SYNC, f"shop-sync:order:{of_order}:{reason}", of_order,
                    None, outbox_id, {"event": topic, "reason": reason}),
        ]  # fmt: skip
    return []


def jobs_for_events(events: Iterable[Any]) -> list[JobSpec]:
    """``events``: outbox rows (id, topic, payload). One spec per key, first event wins."""
    specs: dict[str, JobSpec] = {}
    for event in events:
        for spec in jobs_for_event(event.id, event.topic, event.payload):
            specs.setdefault(spec.key, spec)
    return list(specs.values())


RETRY_TOPIC = "job.retry"


def retried_job_ids(events: Iterable[Any]) -> list[int]:
    """Jobs that ``retryIntegrationJob`` put back, from outbox rows (``job.retry`` events)."""
    return [int(e.payload["job_id"]) for e in events if e.topic == RETRY_TOPIC]


async def retry_job(conn: AsyncConnection, job_id: int) -> Any:
    """Put a FAILED or DEAD job back to PENDING. It is enqueued through the outbox (a
    ``job.retry`` event in this same transaction), so a Redis outage cannot lose the retry."""
    job = await repo.lock_job(conn, job_id)
    if job is None:
        raise ProblemsError([Problem("NOT_FOUND", "No such integration job.", ("jobId",))])
    revived = await repo.revive_job(conn, job_id)
    if revived is None:
        raise ProblemsError(
            [
                Problem(
                    "INVALID_STATE",
                    f"Only FAILED or DEAD jobs can be retried; this one is {job.status.value}.",
                    ("jobId",),
                )
            ]
        )
    await outbox.add_events(
        conn, [{"topic": RETRY_TOPIC, "key": f"job:{job_id}", "payload": {"job_id": job_id}}]
    )
    return revived


@dataclass(frozen=True)
class InvoiceData:
    order: Any
    lines: list[Any]

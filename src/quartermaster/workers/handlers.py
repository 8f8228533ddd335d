"""One handler per job kind: read what the partner needs, call it, return the external ref.

Handlers are idempotent: the job's key goes out as ``Idempotency-Key``, so a redelivered job
(a worker crashed after the partner answered, a relay repeated itself) does not make a second
invoice; the job row's SUCCEEDED status makes most redeliveries no-ops before any call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from quartermaster.enums import IntegrationKind
from quartermaster.integrations.clients import Clients
from quartermaster.integrations.errors import PermanentError
from quartermaster.integrations.invoicing.client import InvoiceLine, InvoiceRequest
from quartermaster.integrations.notifications.client import Notification
from quartermaster.integrations.shop.client import (
    MAX_ITEMS_PER_PUSH,
    AvailabilityUpdate,
    figures_digest,
)
from quartermaster.workers.store import JobStore

Handler = Callable[[JobStore, Clients, Any], Awaitable[str | None]]

#: The partner each kind talks to (breakers and metrics are per partner).
PARTNER_OF: dict[IntegrationKind, str] = {
    IntegrationKind.INVOICE: "invoicing",
    IntegrationKind.SHOP_SYNC: "shop",
    IntegrationKind.NOTIFICATION: "notifications",
}


class NotConfiguredError(Exception):
    """The partner has no URL configured: the job waits and is retried (settings may change)."""


async def invoice(store: JobStore, clients: Clients, job: Any) -> str | None:
    if clients.invoicing is None:
        raise NotConfiguredError("invoicing: QM_INVOICING_URL is not set")
    data = await store.invoice_data(int(job.order_id))
    if data is None:
        raise PermanentError("invoicing", f"order {job.order_id} does not exist")
    order = data.order
    request = InvoiceRequest(
        order_id=order.id,
        order_number=order.number,
        customer_id=order.customer_id,
        customer_email=order.email,
        currency=order.currency,
        total=str(order.total),
        lines=[
            InvoiceLine(
                sku=line.sku,
                quantity=line.quantity,
                unit_price=str(line.unit_price),
                line_total=str(line.line_total),
            )
            for line in data.lines
        ],
    )
    result = await clients.invoicing.create_invoice(request, job.idempotency_key)
    return result.invoice_number


async def shop_sync(store: JobStore, clients: Clients, job: Any) -> str | None:
    if clients.shop is None:
        raise NotConfiguredError("shop: QM_SHOP_URL is not set")
    products = await store.products_to_sync(job)
    updates = [
        AvailabilityUpdate(product_id=p.id, sku=p.sku, available=p.available) for p in products
    ]
    # One push per job (an order's products together), split only beyond the shop's limit.
    for start in range(0, len(updates), MAX_ITEMS_PER_PUSH):
        chunk = updates[start : start + MAX_ITEMS_PER_PUSH]
        # The figures are read now, so they belong to the key: a repeat of the same figures is
        # a replay, newer ones after a lost answer (timeout, crashed worker) are a new absolute
        # push, never the same key with another body (409 from an idempotent partner → DEAD).
        key = f"{job.idempotency_key}:{figures_digest(chunk)}"
        await clients.shop.push_availability(chunk, key)
    return None


async def notification(store: JobStore, clients: Clients, job: Any) -> str | None:
    if clients.notifications is None:
        raise NotConfiguredError("notifications: QM_NOTIFY_URL is not set")
    data = await store.invoice_data(int(job.order_id))
    if data is None:
        raise PermanentError("notifications", f"order {job.order_id} does not exist")
    order = data.order
    template = str((job.payload or {}).get("template") or "order-update")
    receipt = await clients.notifications.send(
        Notification(
            template=template,
            recipient=order.email,
            data={
                "order_number": order.number,
                "customer_name": order.customer_name,
                "total": str(order.total),
                "currency": order.currency,
                "reason": (job.payload or {}).get("reason"),
            },
        ),
        job.idempotency_key,
    )
    return receipt.message_id


HANDLERS: dict[IntegrationKind, Handler] = {
    IntegrationKind.INVOICE: invoice,
    IntegrationKind.SHOP_SYNC: shop_sync,
    IntegrationKind.NOTIFICATION: notification,
}

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
from quartermaster.integrations.shop.client import AvailabilityUpdate
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
    several = len(products) > 1
    for product in products:
        base = f"{job.idempotency_key}:{product.sku}" if several else job.idempotency_key
        # The figure is read now, so it belongs to the key: a repeat of the same figure is a
        # replay, a newer one after a lost answer (timeout, crashed worker) is a new absolute
        # push, never the same key with another body (409 from an idempotent partner → DEAD).
        key = f"{base}:available={product.available}"
        await clients.shop.push_availability(
            AvailabilityUpdate(product_id=product.id, sku=product.sku, available=product.available),
            key,
        )
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

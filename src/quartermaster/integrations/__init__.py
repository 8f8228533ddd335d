"""Clients of the partner systems the workers call: invoicing, the online shop, notifications.

No database access here: a worker loads what it needs, calls a client and records the outcome.
Every call carries an idempotency key and fails with a :class:`RetryableError` or a
:class:`PermanentError`. ``sandbox.py`` is a fake of all three partners for development and
tests; import it explicitly (it pulls in Starlette and uvicorn, which workers do not need).
"""

from quartermaster.integrations.base import OnCall, PartnerClient
from quartermaster.integrations.clients import Clients, build_clients
from quartermaster.integrations.errors import PartnerError, PermanentError, RetryableError
from quartermaster.integrations.invoicing import (
    Invoice,
    InvoiceLine,
    InvoiceRequest,
    InvoicingClient,
)
from quartermaster.integrations.notifications import (
    Notification,
    NotificationClient,
    NotificationReceipt,
)
from quartermaster.integrations.shop import AvailabilityAck, AvailabilityUpdate, ShopClient
from quartermaster.integrations.signing import DEV_SIGNING_SECRET, SIGNATURE_HEADER, sign, verify

__all__ = [
    "DEV_SIGNING_SECRET",
    "SIGNATURE_HEADER",
    "AvailabilityAck",
    "AvailabilityUpdate",
    "Clients",
    "Invoice",
    "InvoiceLine",
    "InvoiceRequest",
    "InvoicingClient",
    "Notification",
    "NotificationClient",
    "NotificationReceipt",
    "OnCall",
    "PartnerClient",
    "PartnerError",
    "PermanentError",
    "RetryableError",
    "ShopClient",
    "build_clients",
    "sign",
    "verify",
]

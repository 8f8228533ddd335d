"""The invoicing partner: turns a confirmed order into an invoice and answers its number."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quartermaster.integrations.base import PartnerClient, require


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    sku: str
    quantity: int
    #: Money is sent as decimal strings ("12.50"): JSON numbers would go through a float.
    unit_price: str
    line_total: str


@dataclass(frozen=True, slots=True)
class InvoiceRequest:
    order_id: int
    order_number: str
    customer_id: int
    customer_email: str | None
    currency: str
    total: str
    lines: list[InvoiceLine]

    def to_json(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "order_number": self.order_number,
            "customer_id": self.customer_id,
            "customer_email": self.customer_email,
            "currency": self.currency,
            "total": self.total,
            "lines": [
                {
                    "sku": line.sku,
                    "quantity": line.quantity,
                    "unit_price": line.unit_price,
                    "line_total": line.line_total,
                }
                for line in self.lines
            ],
        }


@dataclass(frozen=True, slots=True)
class Invoice:
    invoice_number: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Invoice:
        return cls(invoice_number=require(data, "invoice_number", str))


class InvoicingClient(PartnerClient):
    partner = "invoicing"

    async def create_invoice(self, request: InvoiceRequest, idempotency_key: str) -> Invoice:
        """Create the invoice for an order; a repeat with the same key returns the same invoice.

        Use one key per order (not per attempt), so a retry after a timeout can never bill a
        customer twice.
        """
        return await self._call(
            "POST",
            "/v1/invoices",
            request.to_json(),
            idempotency_key=idempotency_key,
            parse=Invoice.from_json,
        )

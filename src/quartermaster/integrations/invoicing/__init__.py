"""Client of the invoicing partner."""

from quartermaster.integrations.invoicing.client import (
    Invoice,
    InvoiceLine,
    InvoiceRequest,
    InvoicingClient,
)

__all__ = ["Invoice", "InvoiceLine", "InvoiceRequest", "InvoicingClient"]

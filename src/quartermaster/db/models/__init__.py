"""SQLAlchemy models: one module per domain, all on one metadata."""

from quartermaster.enums import (
    CustomerTier,
    IntegrationKind,
    IntegrationStatus,
    OrderStatus,
    QuotationStatus,
    StockChangeReason,
)

from .base import Base
from .customer import Customer
from .integration import IntegrationJob, OutboxEvent
from .order import Order, OrderLine, StockAllocation
from .product import Product
from .quotation import Quotation, QuotationLine
from .stock import StockLevel, StockMovement
from .warehouse import Warehouse

__all__ = [
    "Base",
    "Customer",
    "CustomerTier",
    "IntegrationJob",
    "IntegrationKind",
    "IntegrationStatus",
    "Order",
    "OrderLine",
    "OrderStatus",
    "OutboxEvent",
    "Product",
    "Quotation",
    "QuotationLine",
    "QuotationStatus",
    "StockAllocation",
    "StockChangeReason",
    "StockLevel",
    "StockMovement",
    "Warehouse",
]

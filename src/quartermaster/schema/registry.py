"""What each table's rows become when a loader hands them out (see ``Loaders(convert=...)``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from quartermaster.schema.customer import CustomerType
from quartermaster.schema.integration import IntegrationJobType
from quartermaster.schema.order import OrderLineType, OrderType
from quartermaster.schema.product import ProductType
from quartermaster.schema.quotation import QuotationLineType, QuotationType
from quartermaster.schema.stock import StockAllocationType, StockLevelType
from quartermaster.schema.warehouse import WarehouseType

ROW_TYPES: Mapping[str, Any] = {
    "customers": CustomerType.from_row,
    "warehouses": WarehouseType.from_row,
    "products": ProductType.from_row,
    "stock_levels": StockLevelType.from_row,
    "stock_allocations": StockAllocationType.from_row,
    "orders": OrderType.from_row,
    "order_lines": OrderLineType.from_row,
    "quotations": QuotationType.from_row,
    "quotation_lines": QuotationLineType.from_row,
    "integration_jobs": IntegrationJobType.from_row,
}

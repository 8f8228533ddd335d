"""GraphQL enums. Domain enums are shared with the database layer, exposed here by name."""

from __future__ import annotations

import enum

import strawberry

from quartermaster.enums import (
    CustomerTier,
    IntegrationKind,
    IntegrationStatus,
    OrderStatus,
    QuotationStatus,
    StockChangeReason,
)

strawberry.enum(CustomerTier, name="CustomerTier", description="Pricing tier.")
strawberry.enum(
    OrderStatus,
    name="OrderStatus",
    description="PENDING → CONFIRMED → FULFILLED; PENDING or CONFIRMED → CANCELLED.",
)
strawberry.enum(
    QuotationStatus,
    name="QuotationStatus",
    description="DRAFT → SENT → ACCEPTED / REJECTED / EXPIRED. A SENT quotation past "
    "`validUntil` always reads as EXPIRED.",
)
strawberry.enum(
    StockChangeReason, name="StockChangeReason", description="Why a stock level changed."
)
strawberry.enum(IntegrationKind, name="IntegrationKind", description="Which partner system.")
strawberry.enum(IntegrationStatus, name="IntegrationStatus", description="Delivery state of a job.")


@strawberry.enum(name="SortDirection")
class SortDirection(enum.Enum):
    ASC = "ASC"
    DESC = "DESC"


@strawberry.enum(name="ProductSortField")
class ProductSortField(enum.Enum):
    NAME = "NAME"
    SKU = "SKU"
    PRICE = "PRICE"
    CREATED_AT = "CREATED_AT"


@strawberry.enum(name="OrderSortField")
class OrderSortField(enum.Enum):
    CREATED_AT = "CREATED_AT"
    NUMBER = "NUMBER"
    TOTAL = "TOTAL"


@strawberry.enum(name="Role", description="Who the bearer token says the caller is.")
class Role(enum.Enum):
    ADMIN = "ADMIN"
    STAFF = "STAFF"
    CUSTOMER = "CUSTOMER"


__all__ = [
    "CustomerTier",
    "IntegrationKind",
    "IntegrationStatus",
    "OrderSortField",
    "OrderStatus",
    "ProductSortField",
    "QuotationStatus",
    "Role",
    "SortDirection",
    "StockChangeReason",
]

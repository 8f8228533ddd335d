from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any

import strawberry
from sqlalchemy.engine import Row
from strawberry.types import Info

from quartermaster.context import Context
from quartermaster.db.repositories.quotation import QuotationFilterSpec
from quartermaster.enums import QuotationStatus as DomainQuotationStatus
from quartermaster.schema.customer import CustomerType
from quartermaster.schema.enums import QuotationStatus
from quartermaster.schema.errors import UserError
from quartermaster.schema.node import Node, awaited, decode_id, encode_id
from quartermaster.schema.product import ProductType

if TYPE_CHECKING:
    from quartermaster.schema.order import OrderType


def effective_status(status: DomainQuotationStatus, valid_until: datetime) -> Any:
    """A SENT quotation past ``validUntil`` is EXPIRED, whether or not a job flipped it yet."""
    if status is DomainQuotationStatus.SENT and valid_until <= datetime.now(UTC):
        return DomainQuotationStatus.EXPIRED
    return status


@strawberry.type(name="Quotation", description="A price offer that can be turned into an order.")
class QuotationType(Node):
    pk: strawberry.Private[int]
    customer_id: strawberry.Private[int]
    number: str = strawberry.field(description="Human-facing number, unique, e.g. QT-000042.")
    status: QuotationStatus
    currency: str
    subtotal: Decimal
    discount_total: Decimal
    total: Decimal
    valid_until: datetime = strawberry.field(description="After this the offer is EXPIRED.")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Row[Any]) -> QuotationType:
        return cls(
            id=encode_id("Quotation", row.id),
            pk=row.id,
            customer_id=row.customer_id,
            number=row.number,
            status=effective_status(row.status, row.valid_until),
            currency=row.currency,
            subtotal=row.subtotal,
            discount_total=row.discount_total,
            total=row.total,
            valid_until=row.valid_until,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )

    @strawberry.field
    def customer(self, info: Info[Context, None]) -> CustomerType:
        return awaited(info.context.loaders.customer_by_id.load(self.customer_id))

    @strawberry.field
    def lines(self, info: Info[Context, None]) -> list[QuotationLineType]:
        return awaited(info.context.loaders.quotation_lines_by_quotation.load(self.pk))

    @strawberry.field(description="Set once the quotation was accepted and converted.")
    def order(
        self, info: Info[Context, None]
    ) -> Annotated[OrderType, strawberry.lazy("quartermaster.schema.order")] | None:
        return awaited(info.context.loaders.order_by_quotation.load(self.pk))


@strawberry.type(name="QuotationLine", description="One product of a quotation.")
class QuotationLineType(Node):
    pk: strawberry.Private[int]
    quotation_id: strawberry.Private[int]
    product_id: strawberry.Private[int]
    quantity: int
    unit_price: Decimal
    discount_percent: Decimal = strawberry.field(description="0–100, on top of nothing else.")
    line_total: Decimal

    @classmethod
    def from_row(cls, row: Row[Any]) -> QuotationLineType:
        return cls(
            id=encode_id("QuotationLine", row.id),
            pk=row.id,
            quotation_id=row.quotation_id,
            product_id=row.product_id,
            quantity=row.quantity,
            unit_price=row.unit_price,
            discount_percent=row.discount_percent,
            line_total=row.line_total,
        )

    @strawberry.field
    def quotation(self, info: Info[Context, None]) -> QuotationType:
        return awaited(info.context.loaders.quotation_by_id.load(self.quotation_id))

    @strawberry.field
    def product(self, info: Info[Context, None]) -> ProductType:
        return awaited(info.context.loaders.product_by_id.load(self.product_id))


@strawberry.input(name="QuotationFilter", description="Narrows a quotations connection.")
class QuotationFilter:
    status: list[QuotationStatus] | None = None
    customer_id: strawberry.ID | None = None

    def to_spec(self) -> QuotationFilterSpec:
        return QuotationFilterSpec(
            statuses=list(self.status) if self.status is not None else None,
            customer_id=decode_id(self.customer_id, "Customer", "filter.customerId")
            if self.customer_id is not None
            else None,
        )


@strawberry.input(name="QuotationLineInput")
class QuotationLineInput:
    product_id: strawberry.ID
    quantity: int
    discount_percent: Decimal | None = strawberry.field(default=None, description="0–100.")


@strawberry.input(name="CreateQuotationInput")
class CreateQuotationInput:
    customer_id: strawberry.ID
    lines: list[QuotationLineInput]
    valid_until: datetime | None = None


@strawberry.input(name="UpdateQuotationInput")
class UpdateQuotationInput:
    quotation_id: strawberry.ID
    lines: list[QuotationLineInput] | None = None
    valid_until: datetime | None = None


@strawberry.input(name="QuotationIdInput")
class QuotationIdInput:
    quotation_id: strawberry.ID


@strawberry.input(name="AcceptQuotationInput")
class AcceptQuotationInput:
    quotation_id: strawberry.ID
    idempotency_key: str | None = None


@strawberry.type(name="QuotationPayload")
class QuotationPayload:
    quotation: QuotationType | None
    errors: list[UserError]

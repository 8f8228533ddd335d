from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any

import strawberry
from sqlalchemy.engine import Row
from strawberry.types import Info

from quartermaster.context import Context
from quartermaster.db.pagination import Sort
from quartermaster.db.repositories.order import OrderFilterSpec, order_sort
from quartermaster.schema.customer import CustomerType
from quartermaster.schema.enums import OrderSortField, OrderStatus, SortDirection
from quartermaster.schema.errors import UserError
from quartermaster.schema.integration import IntegrationJobType
from quartermaster.schema.node import Node, awaited, decode_id, encode_id
from quartermaster.schema.product import ProductType
from quartermaster.schema.stock import StockAllocationType

if TYPE_CHECKING:
    from quartermaster.schema.quotation import QuotationType


@strawberry.type(name="Order", description="A customer's order.")
class OrderType(Node):
    pk: strawberry.Private[int]
    customer_id: strawberry.Private[int]
    quotation_id: strawberry.Private[int | None]
    number: str = strawberry.field(description="Human-facing number, unique, e.g. SO-000123.")
    status: OrderStatus
    currency: str
    subtotal: Decimal = strawberry.field(description="Σ quantity × unitPrice.")
    discount_total: Decimal = strawberry.field(description="Σ line discounts.")
    total: Decimal = strawberry.field(description="subtotal − discountTotal = Σ lineTotal.")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Row[Any]) -> OrderType:
        return cls(
            id=encode_id("Order", row.id),
            pk=row.id,
            customer_id=row.customer_id,
            quotation_id=row.quotation_id,
            number=row.number,
            status=row.status,
            currency=row.currency,
            subtotal=row.subtotal,
            discount_total=row.discount_total,
            total=row.total,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )

    @strawberry.field
    def customer(self, info: Info[Context, None]) -> CustomerType:
        return awaited(info.context.loaders.customer_by_id.load(self.customer_id))

    @strawberry.field
    def lines(self, info: Info[Context, None]) -> list[OrderLineType]:
        return awaited(info.context.loaders.order_lines_by_order.load(self.pk))

    @strawberry.field(description="The quotation this order was converted from, if any.")
    def quotation(
        self, info: Info[Context, None]
    ) -> Annotated[QuotationType, strawberry.lazy("quartermaster.schema.quotation")] | None:
        if self.quotation_id is None:
            return None
        return awaited(info.context.loaders.quotation_by_id.load(self.quotation_id))

    @strawberry.field(
        description="Integration work that this order caused (invoice, shop sync, notification)."
    )
    def integrations(self, info: Info[Context, None]) -> list[IntegrationJobType]:
        return awaited(info.context.loaders.integration_jobs_by_order.load(self.pk))


@strawberry.type(name="OrderLine", description="One product of an order.")
class OrderLineType(Node):
    pk: strawberry.Private[int]
    order_id: strawberry.Private[int]
    product_id: strawberry.Private[int]
    quantity: int
    unit_price: Decimal = strawberry.field(description="Price per unit when the order was placed.")
    discount: Decimal = strawberry.field(description="Discount amount of the whole line.")
    line_total: Decimal = strawberry.field(description="quantity × unitPrice − discount.")

    @classmethod
    def from_row(cls, row: Row[Any]) -> OrderLineType:
        return cls(
            id=encode_id("OrderLine", row.id),
            pk=row.id,
            order_id=row.order_id,
            product_id=row.product_id,
            quantity=row.quantity,
            unit_price=row.unit_price,
            discount=row.discount,
            line_total=row.line_total,
        )

    @strawberry.field
    def order(self, info: Info[Context, None]) -> OrderType:
        return awaited(info.context.loaders.order_by_id.load(self.order_id))

    @strawberry.field
    def product(self, info: Info[Context, None]) -> ProductType:
        return awaited(info.context.loaders.product_by_id.load(self.product_id))

    @strawberry.field(
        description="Where the reserved units come from; quantities add up to `quantity`."
    )
    def allocations(self, info: Info[Context, None]) -> list[StockAllocationType]:
        return awaited(info.context.loaders.allocations_by_order_line.load(self.pk))


@strawberry.input(name="OrderFilter", description="Narrows an orders connection.")
class OrderFilter:
    status: list[OrderStatus] | None = None
    customer_id: strawberry.ID | None = None
    created_after: datetime | None = strawberry.field(
        default=None, description="Inclusive lower bound on createdAt."
    )
    created_before: datetime | None = strawberry.field(
        default=None, description="Exclusive upper bound on createdAt."
    )

    def to_spec(self) -> OrderFilterSpec:
        return OrderFilterSpec(
            statuses=list(self.status) if self.status is not None else None,
            customer_id=decode_id(self.customer_id, "Customer", "filter.customerId")
            if self.customer_id is not None
            else None,
            created_after=self.created_after,
            created_before=self.created_before,
        )


@strawberry.input(name="OrderOrder", description="Ordering of an orders connection.")
class OrderOrder:
    field: OrderSortField
    direction: SortDirection = SortDirection.DESC


def order_sort_of(order_by: OrderOrder | None, scope: str = "orders") -> Sort:
    if order_by is None:
        return order_sort("CREATED_AT", True, scope)
    return order_sort(order_by.field.value, order_by.direction is SortDirection.DESC, scope)


@strawberry.input(name="OrderLineInput")
class OrderLineInput:
    product_id: strawberry.ID
    quantity: int


@strawberry.input(name="PlaceOrderInput")
class PlaceOrderInput:
    customer_id: strawberry.ID
    lines: list[OrderLineInput]
    idempotency_key: str | None = strawberry.field(
        default=None,
        description="Same key + same input returns the first result instead of a second order.",
    )


@strawberry.input(name="OrderIdInput")
class OrderIdInput:
    order_id: strawberry.ID


@strawberry.input(name="CancelOrderInput")
class CancelOrderInput:
    order_id: strawberry.ID
    reason: str | None = None


@strawberry.type(name="OrderPayload")
class OrderPayload:
    order: OrderType | None
    errors: list[UserError]

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import strawberry
from sqlalchemy.engine import Row
from strawberry.types import Info

from quartermaster.context import Context
from quartermaster.db.repositories.customer import CustomerFilterSpec
from quartermaster.db.repositories.order import orders, select_orders
from quartermaster.db.repositories.quotation import quotations, select_quotations
from quartermaster.schema.enums import CustomerTier
from quartermaster.schema.node import Node, encode_id
from quartermaster.schema.pagination import Connection, nested_connection, page_args

if TYPE_CHECKING:
    from quartermaster.schema.order import OrderFilter, OrderOrder, OrderType
    from quartermaster.schema.quotation import QuotationFilter, QuotationType

ORDER = "quartermaster.schema.order"
QUOTATION = "quartermaster.schema.quotation"


@strawberry.type(name="Customer", description="A business that buys from us.")
class CustomerType(Node):
    pk: strawberry.Private[int]
    name: str
    email: str
    tier: CustomerTier = strawberry.field(description="Decides the customer's discount.")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Row[Any]) -> CustomerType:
        return cls(
            id=encode_id("Customer", row.id),
            pk=row.id,
            name=row.name,
            email=row.email,
            tier=row.tier,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )

    @strawberry.field(description="This customer's orders, newest first unless `orderBy` says.")
    async def orders(
        self,
        info: Info[Context, None],
        first: int | None = None,
        after: str | None = None,
        last: int | None = None,
        before: str | None = None,
        filter: Annotated[OrderFilter, strawberry.lazy(ORDER)] | None = None,
        order_by: Annotated[OrderOrder, strawberry.lazy(ORDER)] | None = None,
    ) -> Connection[Annotated[OrderType, strawberry.lazy(ORDER)]]:
        from quartermaster.schema.order import OrderType, order_sort_of

        ctx = info.context
        spec = filter.to_spec() if filter is not None else None
        return await nested_connection(
            ctx,
            "customer.orders",
            self.pk,
            select_orders(spec),
            orders.c.customer_id,
            order_sort_of(order_by, scope="customer.orders"),
            page_args(ctx, first, after, last, before),
            OrderType.from_row,
            spec,
        )

    @strawberry.field(description="This customer's quotations, newest first.")
    async def quotations(
        self,
        info: Info[Context, None],
        first: int | None = None,
        after: str | None = None,
        last: int | None = None,
        before: str | None = None,
        filter: Annotated[QuotationFilter, strawberry.lazy(QUOTATION)] | None = None,
    ) -> Connection[Annotated[QuotationType, strawberry.lazy(QUOTATION)]]:
        from quartermaster.db.repositories.quotation import quotation_sort
        from quartermaster.schema.quotation import QuotationType

        ctx = info.context
        spec = filter.to_spec() if filter is not None else None
        return await nested_connection(
            ctx,
            "customer.quotations",
            self.pk,
            select_quotations(spec),
            quotations.c.customer_id,
            quotation_sort("customer.quotations"),
            page_args(ctx, first, after, last, before),
            QuotationType.from_row,
            spec,
        )


@strawberry.input(name="CustomerFilter", description="Narrows the `customers` connection.")
class CustomerFilter:
    search: str | None = strawberry.field(
        default=None, description="Case-insensitive match on name or email."
    )
    tier: CustomerTier | None = None

    def to_spec(self) -> CustomerFilterSpec:
        return CustomerFilterSpec(search=self.search, tier=self.tier)

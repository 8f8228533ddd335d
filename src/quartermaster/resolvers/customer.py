from __future__ import annotations

import strawberry
from strawberry.types import Info

from quartermaster.context import Context
from quartermaster.db.repositories.customer import CUSTOMER_SORT, select_customers
from quartermaster.schema.customer import CustomerFilter, CustomerType
from quartermaster.schema.pagination import Connection, page_args, root_connection


@strawberry.type
class CustomerQuery:
    @strawberry.field(description="Customers, by name.")
    async def customers(
        self,
        info: Info[Context, None],
        first: int | None = None,
        after: str | None = None,
        last: int | None = None,
        before: str | None = None,
        filter: CustomerFilter | None = None,
    ) -> Connection[CustomerType]:
        ctx = info.context
        args = page_args(ctx, first, after, last, before)
        base = select_customers(filter.to_spec() if filter is not None else None)
        return await root_connection(ctx, base, CUSTOMER_SORT, args, CustomerType.from_row)

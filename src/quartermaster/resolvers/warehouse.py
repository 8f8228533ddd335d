from __future__ import annotations

import strawberry
from strawberry.types import Info

from quartermaster.context import Context
from quartermaster.db.repositories.warehouse import WAREHOUSE_SORT, select_warehouses
from quartermaster.schema.pagination import Connection, page_args, root_connection
from quartermaster.schema.warehouse import WarehouseType


@strawberry.type
class WarehouseQuery:
    @strawberry.field(description="All warehouses, by code.")
    async def warehouses(
        self,
        info: Info[Context, None],
        first: int | None = None,
        after: str | None = None,
        last: int | None = None,
        before: str | None = None,
    ) -> Connection[WarehouseType]:
        ctx = info.context
        args = page_args(ctx, first, after, last, before)
        return await root_connection(
            ctx, select_warehouses(), WAREHOUSE_SORT, args, WarehouseType.from_row
        )

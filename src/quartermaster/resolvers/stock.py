from __future__ import annotations

import strawberry
from strawberry.types import Info

from quartermaster.context import Context
from quartermaster.db.repositories.stock import STOCK_LEVEL_SORT, select_stock_levels
from quartermaster.resolvers.common import input_ids, to_user_errors, write_then_read
from quartermaster.schema.pagination import Connection, page_args, root_connection
from quartermaster.schema.stock import (
    AdjustStockInput,
    StockLevelFilter,
    StockLevelPayload,
    StockLevelType,
)
from quartermaster.services import stock as service
from quartermaster.services.errors import ProblemsError


@strawberry.type
class StockQuery:
    @strawberry.field(description="Stock levels across warehouses, by id.")
    async def stock_levels(
        self,
        info: Info[Context, None],
        first: int | None = None,
        after: str | None = None,
        last: int | None = None,
        before: str | None = None,
        filter: StockLevelFilter | None = None,
    ) -> Connection[StockLevelType]:
        ctx = info.context
        args = page_args(ctx, first, after, last, before)
        base = select_stock_levels(filter.to_spec() if filter is not None else None)
        return await root_connection(ctx, base, STOCK_LEVEL_SORT, args, StockLevelType.from_row)


@strawberry.type
class StockMutation:
    @strawberry.mutation(
        description="Changes onHand (RECEIPT or ADJUSTMENT) and optionally the low-stock "
        "threshold; creates the stock level if the warehouse had none. onHand never drops "
        "below reserved."
    )
    async def adjust_stock(
        self, info: Info[Context, None], input: AdjustStockInput
    ) -> StockLevelPayload:
        ctx = info.context
        try:
            product_id, warehouse_id = input_ids(
                [
                    (input.product_id, "Product", ("productId",)),
                    (input.warehouse_id, "Warehouse", ("warehouseId",)),
                ]
            )
            level = await write_then_read(
                ctx,
                lambda conn: service.adjust_stock(
                    conn,
                    product_id,
                    warehouse_id,
                    input.delta,
                    input.reason,
                    input.low_stock_threshold,
                ),
                "stock_levels",
            )
        except ProblemsError as exc:
            return StockLevelPayload(stock_level=None, errors=to_user_errors(exc.problems))
        return StockLevelPayload(stock_level=level, errors=[])

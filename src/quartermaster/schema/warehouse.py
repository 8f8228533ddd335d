from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import strawberry
from sqlalchemy.engine import Row
from strawberry.types import Info

from quartermaster.context import Context
from quartermaster.db.repositories.stock import (
    WAREHOUSE_STOCK_SORT,
    StockLevelFilterSpec,
    select_stock_levels,
    stock_levels,
)
from quartermaster.schema.node import Node, encode_id
from quartermaster.schema.pagination import Connection, nested_connection, page_args

if TYPE_CHECKING:
    from quartermaster.schema.stock import StockLevelType


@strawberry.type(name="Warehouse", description="A place that holds stock.")
class WarehouseType(Node):
    pk: strawberry.Private[int]
    code: str = strawberry.field(description="Short unique code, e.g. WH-AMS.")
    name: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Row[Any]) -> WarehouseType:
        return cls(
            id=encode_id("Warehouse", row.id),
            pk=row.id,
            code=row.code,
            name=row.name,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )

    @classmethod
    def from_joined(cls, row: Row[Any]) -> WarehouseType:
        """The warehouse carried by a stock-level or allocation row (see ``warehouse_columns``)."""
        return cls(
            id=encode_id("Warehouse", row.warehouse_id),
            pk=row.warehouse_id,
            code=row.wh_code,
            name=row.wh_name,
            created_at=row.wh_created_at,
            updated_at=row.wh_updated_at,
        )

    @strawberry.field(description="Stock levels held in this warehouse, by id.")
    async def stock_levels(
        self,
        info: Info[Context, None],
        first: int | None = None,
        after: str | None = None,
        last: int | None = None,
        before: str | None = None,
        only_low: bool | None = False,
    ) -> Connection[Annotated[StockLevelType, strawberry.lazy("quartermaster.schema.stock")]]:
        from quartermaster.schema.stock import StockLevelType

        ctx = info.context
        spec = StockLevelFilterSpec(only_low=bool(only_low))
        return await nested_connection(
            ctx,
            "warehouse.stockLevels",
            self.pk,
            select_stock_levels(spec),
            stock_levels.c.warehouse_id,
            WAREHOUSE_STOCK_SORT,
            page_args(ctx, first, after, last, before),
            StockLevelType.from_row,
            spec,
        )

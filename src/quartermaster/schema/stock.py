from __future__ import annotations

from datetime import datetime
from typing import Any

import strawberry
from sqlalchemy.engine import Row
from strawberry.types import Info

from quartermaster.context import Context
from quartermaster.db.repositories.stock import StockLevelFilterSpec
from quartermaster.schema.enums import StockChangeReason
from quartermaster.schema.errors import UserError
from quartermaster.schema.node import Node, awaited, decode_id, encode_id
from quartermaster.schema.product import ProductType
from quartermaster.schema.warehouse import WarehouseType


@strawberry.type(name="StockLevel", description="Stock of one product in one warehouse.")
class StockLevelType(Node):
    pk: strawberry.Private[int]
    product_id: strawberry.Private[int]
    warehouse_id: strawberry.Private[int]
    on_hand: int = strawberry.field(description="Units physically in the warehouse.")
    reserved: int = strawberry.field(description="Units promised to open orders.")
    available: int = strawberry.field(description="onHand - reserved")
    low_stock_threshold: int
    is_low: bool = strawberry.field(description="available <= lowStockThreshold")
    updated_at: datetime
    warehouse: WarehouseType

    @classmethod
    def from_row(cls, row: Row[Any]) -> StockLevelType:
        available = row.on_hand - row.reserved
        return cls(
            id=encode_id("StockLevel", row.id),
            pk=row.id,
            product_id=row.product_id,
            warehouse_id=row.warehouse_id,
            on_hand=row.on_hand,
            reserved=row.reserved,
            available=available,
            low_stock_threshold=row.low_stock_threshold,
            is_low=available <= row.low_stock_threshold,
            updated_at=row.updated_at,
            warehouse=WarehouseType.from_joined(row),
        )

    @strawberry.field
    def product(self, info: Info[Context, None]) -> ProductType:
        return awaited(info.context.loaders.product_by_id.load(self.product_id))


@strawberry.type(
    name="StockAllocation", description="Units of an order line reserved in a warehouse."
)
class StockAllocationType:
    warehouse: WarehouseType
    quantity: int

    @classmethod
    def from_row(cls, row: Row[Any]) -> StockAllocationType:
        return cls(warehouse=WarehouseType.from_joined(row), quantity=row.quantity)


@strawberry.input(name="StockLevelFilter", description="Narrows the `stockLevels` connection.")
class StockLevelFilter:
    product_ids: list[strawberry.ID] | None = None
    warehouse_ids: list[strawberry.ID] | None = None
    only_low: bool | None = strawberry.field(
        default=None, description="Only levels where available <= lowStockThreshold."
    )

    def to_spec(self) -> StockLevelFilterSpec:
        return StockLevelFilterSpec(
            product_ids=[decode_id(i, "Product", "filter.productIds") for i in self.product_ids]
            if self.product_ids is not None
            else None,
            warehouse_ids=[
                decode_id(i, "Warehouse", "filter.warehouseIds") for i in self.warehouse_ids
            ]
            if self.warehouse_ids is not None
            else None,
            only_low=bool(self.only_low),
        )


@strawberry.input(name="AdjustStockInput")
class AdjustStockInput:
    product_id: strawberry.ID
    warehouse_id: strawberry.ID
    delta: int = strawberry.field(
        description="Change to onHand; negative removes units. onHand may never drop below "
        "reserved."
    )
    reason: StockChangeReason = StockChangeReason.ADJUSTMENT
    low_stock_threshold: int | None = None


@strawberry.type(name="StockLevelPayload")
class StockLevelPayload:
    stock_level: StockLevelType | None
    errors: list[UserError]

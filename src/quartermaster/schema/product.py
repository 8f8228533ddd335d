from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any

import strawberry
from sqlalchemy.engine import Row
from strawberry.types import Info

from quartermaster.context import Context
from quartermaster.db.repositories.product import ProductFilterSpec
from quartermaster.schema.enums import ProductSortField, SortDirection
from quartermaster.schema.errors import UserError
from quartermaster.schema.node import Node, awaited, encode_id

if TYPE_CHECKING:
    from quartermaster.schema.stock import StockLevelType


@strawberry.type(name="Product", description="A sellable item of the catalogue.")
class ProductType(Node):
    pk: strawberry.Private[int]
    sku: str = strawberry.field(description="Stock keeping unit, unique.")
    name: str
    description: str | None
    category: str | None
    unit_price: Decimal = strawberry.field(description="List price per unit, before discounts.")
    currency: str = strawberry.field(description="ISO-4217 code, e.g. EUR.")
    active: bool = strawberry.field(description="Inactive products cannot be ordered.")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Row[Any]) -> ProductType:
        return cls(
            id=encode_id("Product", row.id),
            pk=row.id,
            sku=row.sku,
            name=row.name,
            description=row.description,
            category=row.category,
            unit_price=row.unit_price,
            currency=row.currency,
            active=row.active,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )

    @strawberry.field(
        description="One entry per warehouse that holds a stock record for this product."
    )
    def stock(
        self, info: Info[Context, None]
    ) -> list[Annotated[StockLevelType, strawberry.lazy("quartermaster.schema.stock")]]:
        return awaited(info.context.loaders.stock_levels_by_product.load(self.pk))

    @strawberry.field(description="Sum of `available` over all warehouses.")
    async def available_quantity(self, info: Info[Context, None]) -> int:
        levels = await info.context.loaders.stock_levels_by_product.load(self.pk)
        return sum(level.available for level in levels)


@strawberry.input(name="ProductOrder", description="Ordering of the `products` connection.")
class ProductOrder:
    field: ProductSortField
    direction: SortDirection = SortDirection.ASC


@strawberry.input(name="ProductFilter", description="Narrows the `products` connection.")
class ProductFilter:
    search: str | None = strawberry.field(
        default=None, description="Case-insensitive match on name or SKU."
    )
    category: str | None = None
    skus: list[str] | None = None
    active: bool | None = None
    min_price: Decimal | None = None
    max_price: Decimal | None = None
    in_stock: bool | None = strawberry.field(
        default=None, description="Only products with availableQuantity > 0."
    )

    def to_spec(self) -> ProductFilterSpec:
        return ProductFilterSpec(
            search=self.search,
            category=self.category,
            skus=list(self.skus) if self.skus is not None else None,
            active=self.active,
            min_price=self.min_price,
            max_price=self.max_price,
            in_stock=self.in_stock,
        )


@strawberry.input(name="CreateProductInput")
class CreateProductInput:
    sku: str = strawberry.field(description="Unique; letters, digits, '.', '_' or '-'.")
    name: str
    description: str | None = None
    category: str | None = None
    unit_price: Decimal = strawberry.field(description="Non-negative, at most 2 decimals.")
    currency: str = "EUR"
    active: bool = True


@strawberry.input(
    name="UpdateProductInput",
    description="Fields left out stay as they are; `description`/`category` set to null clear.",
)
class UpdateProductInput:
    product_id: strawberry.ID
    name: str | None = strawberry.UNSET
    description: str | None = strawberry.UNSET
    category: str | None = strawberry.UNSET
    unit_price: Decimal | None = strawberry.UNSET
    active: bool | None = strawberry.UNSET


@strawberry.type(name="ProductPayload")
class ProductPayload:
    product: ProductType | None
    errors: list[UserError]

from __future__ import annotations

import strawberry
from sqlalchemy.ext.asyncio import AsyncConnection
from strawberry.types import Info

from quartermaster.context import Context
from quartermaster.db.repositories.product import product_sort, select_products
from quartermaster.resolvers.common import input_id, to_user_errors, write_then_read
from quartermaster.schema.enums import SortDirection
from quartermaster.schema.node import awaited
from quartermaster.schema.pagination import Connection, page_args, root_connection
from quartermaster.schema.product import (
    CreateProductInput,
    ProductFilter,
    ProductOrder,
    ProductPayload,
    ProductType,
    UpdateProductInput,
)
from quartermaster.services import product as service
from quartermaster.services.errors import ProblemsError


@strawberry.type
class ProductQuery:
    @strawberry.field(description="The catalogue, filtered and sorted (default: by name).")
    async def products(
        self,
        info: Info[Context, None],
        first: int | None = None,
        after: str | None = None,
        last: int | None = None,
        before: str | None = None,
        filter: ProductFilter | None = None,
        order_by: ProductOrder | None = None,
    ) -> Connection[ProductType]:
        ctx = info.context
        args = page_args(ctx, first, after, last, before)
        field = order_by.field.value if order_by is not None else "NAME"
        descending = order_by is not None and order_by.direction is SortDirection.DESC
        base = select_products(filter.to_spec() if filter is not None else None)
        return await root_connection(
            ctx, base, product_sort(field, descending), args, ProductType.from_row
        )

    @strawberry.field(description="A product by its SKU, or null.")
    def product_by_sku(self, info: Info[Context, None], sku: str) -> ProductType | None:
        return awaited(info.context.loaders.product_by_sku.load(sku))


@strawberry.type
class ProductMutation:
    @strawberry.mutation(description="Adds a product to the catalogue. A taken SKU is CONFLICT.")
    async def create_product(
        self, info: Info[Context, None], input: CreateProductInput
    ) -> ProductPayload:
        ctx = info.context
        new = service.NewProduct(
            sku=input.sku,
            name=input.name,
            description=input.description,
            category=input.category,
            unit_price=input.unit_price,
            currency=input.currency,
            active=input.active,
        )
        try:
            product = await write_then_read(
                ctx, lambda conn: service.create_product(conn, new), "products"
            )
        except ProblemsError as exc:
            return ProductPayload(product=None, errors=to_user_errors(exc.problems))
        return ProductPayload(product=product, errors=[])

    @strawberry.mutation(description="Changes the given fields of a product.")
    async def update_product(
        self, info: Info[Context, None], input: UpdateProductInput
    ) -> ProductPayload:
        ctx = info.context

        def given(value: object) -> bool:
            return value is not strawberry.UNSET

        try:
            product_id = input_id(input.product_id, "Product", "productId")
            changes = service.ProductChanges(
                name=input.name if given(input.name) else None,
                description=input.description if given(input.description) else None,
                category=input.category if given(input.category) else None,
                unit_price=input.unit_price if given(input.unit_price) else None,
                active=input.active if given(input.active) else None,
                clear=frozenset(
                    name
                    for name, value in (
                        ("description", input.description),
                        ("category", input.category),
                    )
                    if value is None
                ),
            )

            async def update(conn: AsyncConnection) -> int:
                await service.update_product(conn, product_id, changes)
                return product_id

            product = await write_then_read(ctx, update, "products")
        except ProblemsError as exc:
            return ProductPayload(product=None, errors=to_user_errors(exc.problems))
        return ProductPayload(product=product, errors=[])

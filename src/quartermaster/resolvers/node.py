"""``node``/``nodes`` (Relay object identification) and ``viewer``."""

from __future__ import annotations

import asyncio

import strawberry
from strawberry.types import Info

from quartermaster.auth import Role as AuthRole
from quartermaster.context import Context
from quartermaster.errors import ApiError
from quartermaster.schema.enums import Role
from quartermaster.schema.node import Node, decode_any_id
from quartermaster.schema.viewer import ViewerType

MAX_NODES = 100

#: Global-id type name -> the loader that finds it by primary key
NODE_LOADERS: dict[str, str] = {
    "Product": "product_by_id",
    "Warehouse": "warehouse_by_id",
    "StockLevel": "stock_level_by_id",
    "Customer": "customer_by_id",
    "Order": "order_by_id",
    "OrderLine": "order_line_by_id",
    "Quotation": "quotation_by_id",
    "QuotationLine": "quotation_line_by_id",
    "IntegrationJob": "integration_job_by_id",
}


async def resolve_node(context: Context, global_id: str) -> Node | None:
    type_name, pk = decode_any_id(global_id)
    loader_name = NODE_LOADERS.get(type_name)
    if loader_name is None:
        return None
    node: Node | None = await getattr(context.loaders, loader_name).load(pk)
    return node


@strawberry.type
class NodeQuery:
    @strawberry.field(
        description="The caller, as the bearer token says; null for an anonymous caller."
    )
    async def viewer(self, info: Info[Context, None]) -> ViewerType | None:
        principal = info.context.principal
        if principal.role is AuthRole.ANONYMOUS:
            return None
        customer = None
        if principal.customer_id is not None:
            customer = await info.context.loaders.customer_by_id.load(principal.customer_id)
        return ViewerType(role=Role(principal.role.value), customer=customer)

    @strawberry.field(description="Any object by its global id, or null when there is none.")
    async def node(self, info: Info[Context, None], id: strawberry.ID) -> Node | None:
        return await resolve_node(info.context, id)

    @strawberry.field(
        description=f"Objects by global id, in the order asked, null where there is none "
        f"(at most {MAX_NODES} ids)."
    )
    async def nodes(self, info: Info[Context, None], ids: list[strawberry.ID]) -> list[Node | None]:
        if len(ids) > MAX_NODES:
            raise ApiError(
                f"`ids` may hold at most {MAX_NODES} ids, got {len(ids)}.", code="TOO_MANY_IDS"
            )
        for global_id in ids:
            decode_any_id(global_id)  # reject a malformed id before loading anything
        return list(await asyncio.gather(*(resolve_node(info.context, i) for i in ids)))

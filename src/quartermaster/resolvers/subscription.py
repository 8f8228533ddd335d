from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import strawberry
from strawberry.types import Info

from quartermaster.live.events import EventFilter, parse_cursor
from quartermaster.live.subscription import open_stock_subscription
from quartermaster.schema.node import decode_id
from quartermaster.schema.stock_event import StockChangeEvent


@strawberry.type
class StockSubscription:
    @strawberry.subscription(
        description="Every change to matching stock levels, in commit order, across all server "
        "instances."
    )
    async def stock_changed(
        self,
        info: Info[Any, None],
        product_ids: list[strawberry.ID] | None = None,
        warehouse_ids: list[strawberry.ID] | None = None,
        only_low: bool | None = False,
        after: str | None = None,
    ) -> AsyncGenerator[StockChangeEvent, None]:
        # Arguments are checked here, before the subscription starts: a bad id or cursor is
        # a graphql-transport-ws `error` message with its code, not an event.
        event_filter = EventFilter(
            product_ids=frozenset(decode_id(i, "Product", "productIds") for i in product_ids)
            if product_ids is not None
            else None,
            warehouse_ids=frozenset(
                decode_id(i, "Warehouse", "warehouseIds") for i in warehouse_ids
            )
            if warehouse_ids is not None
            else None,
            only_low=bool(only_low),
        )
        cursor = parse_cursor(after) if after is not None else None
        return await open_stock_subscription(info, event_filter, cursor)  # type: ignore[return-value]

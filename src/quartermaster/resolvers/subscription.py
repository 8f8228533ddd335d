from __future__ import annotations

from collections.abc import AsyncGenerator

import strawberry

from quartermaster.errors import NotImplementedYetError
from quartermaster.schema.stock_event import StockChangeEvent


@strawberry.type
class StockSubscription:
    @strawberry.subscription(
        description="Every change to matching stock levels, in commit order, across all server "
        "instances."
    )
    async def stock_changed(
        self,
        product_ids: list[strawberry.ID] | None = None,
        warehouse_ids: list[strawberry.ID] | None = None,
        only_low: bool | None = False,
        after: str | None = None,
    ) -> AsyncGenerator[StockChangeEvent, None]:
        raise NotImplementedYetError("stockChanged arrives with live stock (issue #5).")
        yield  # pragma: no cover - makes this an async generator

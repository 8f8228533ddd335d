from __future__ import annotations

from datetime import datetime

import strawberry

from quartermaster.schema.enums import StockChangeReason
from quartermaster.schema.stock import StockLevelType


@strawberry.type(name="StockChangeEvent", description="One committed change of a stock level.")
class StockChangeEvent:
    cursor: str = strawberry.field(
        description="Pass it back as `after` to resume without missing an event."
    )
    stock_level: StockLevelType
    reason: StockChangeReason
    on_hand_delta: int
    reserved_delta: int
    occurred_at: datetime

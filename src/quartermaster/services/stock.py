"""Stock: allocation, reservation, release, shipment and manual adjustment.

Every change of a stock level goes through ``record_changes``: one UPDATE written as an
expression on the locked row, one ledger row (stock_movements) and one ``stock.changed`` outbox
event, all in the caller's transaction.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from quartermaster.db.repositories import stock as repo
from quartermaster.enums import StockChangeReason
from quartermaster.services.errors import Problem, ProblemsError

log = structlog.get_logger(__name__)

MAX_ADJUSTMENT = 1_000_000


@dataclass(frozen=True)
class LevelChange:
    """One change of a locked stock level; the statement that applies it reads the levels as
    it leaves them for the outbox event, so nothing "after" is computed here."""

    level_id: int
    reason: StockChangeReason
    on_hand_delta: int
    reserved_delta: int
    order_id: int | None = None


async def record_changes(conn: AsyncConnection, changes: Sequence[LevelChange]) -> None:
    """Apply the deltas (rows already locked), write the ledger and the outbox events: one
    statement (``repo.record_level_changes``)."""
    if not changes:
        return
    if len({c.level_id for c in changes}) != len(changes):
        raise ValueError("record_changes takes each stock level at most once")
    changed = await repo.record_level_changes(
        conn,
        [
            {
                "level_id": c.level_id,
                "on_hand_delta": c.on_hand_delta,
                "reserved_delta": c.reserved_delta,
                "reason": c.reason.value,
                "order_id": c.order_id,
            }
            for c in changes
        ],
    )
    if changed != len(changes):
        raise LookupError(f"{len(changes) - changed} of the stock levels to change do not exist")


@dataclass(frozen=True)
class Allocation:
    level_id: int
    product_id: int
    warehouse_id: int
    quantity: int


def allocate(
    lines: Sequence[tuple[int, int]], levels: Sequence[Row[Any]]
) -> tuple[list[list[Allocation]], list[int]]:
    """Split each ``(product_id, quantity)`` line over warehouses.

    Strategy: the warehouses with the most available units first (ties: lower warehouse id),
    taking all each has, so a line is split only when no single warehouse covers it.
    Returns the allocations per line and the indexes of lines that cannot be covered.
    """
    by_product: dict[int, list[Row[Any]]] = defaultdict(list)
    for level in levels:
        by_product[level.product_id].append(level)
    result: list[list[Allocation]] = []
    short: list[int] = []
    for index, (product_id, quantity) in enumerate(lines):
        candidates = sorted(
            by_product.get(product_id, []),
            key=lambda lv: (-(lv.on_hand - lv.reserved), lv.warehouse_id),
        )
        taken: list[Allocation] = []
        missing = quantity
        for level in candidates:
            available = level.on_hand - level.reserved
            if missing == 0 or available <= 0:
                break
            take = min(available, missing)
            taken.append(Allocation(level.id, product_id, level.warehouse_id, take))
            missing -= take
        if missing:
            short.append(index)
        result.append(taken)
    return result, short


async def adjust_stock(
    conn: AsyncConnection,
    product_id: int,
    warehouse_id: int,
    delta: int,
    reason: StockChangeReason,
    low_stock_threshold: int | None,
) -> int:
    """Change on_hand (and maybe the threshold); returns the stock level id."""
    problems: list[Problem] = []
    if reason not in (StockChangeReason.RECEIPT, StockChangeReason.ADJUSTMENT):
        problems.append(
            Problem(
                "INVALID_INPUT",
                "adjustStock takes reason RECEIPT or ADJUSTMENT; reservations, releases and "
                "shipments come from orders.",
                ("reason",),
            )
        )
    if abs(delta) > MAX_ADJUSTMENT:
        problems.append(
            Problem("INVALID_INPUT", f"`delta` may be at most ±{MAX_ADJUSTMENT}.", ("delta",))
        )
    elif reason is StockChangeReason.RECEIPT and delta <= 0:
        problems.append(Problem("INVALID_INPUT", "A RECEIPT needs a positive `delta`.", ("delta",)))
    elif delta == 0 and low_stock_threshold is None:
        problems.append(
            Problem("INVALID_INPUT", "`delta` is 0 and nothing else changes.", ("delta",))
        )
    if low_stock_threshold is not None and not 0 <= low_stock_threshold <= MAX_ADJUSTMENT:
        problems.append(
            Problem(
                "INVALID_INPUT",
                "`lowStockThreshold` must be between 0 and 1000000.",
                ("lowStockThreshold",),
            )
        )
    if problems:
        raise ProblemsError(problems)
    product_found, warehouse_found = await repo.product_and_warehouse_exist(
        conn, product_id, warehouse_id
    )
    if not product_found:
        raise ProblemsError([Problem("NOT_FOUND", "No such product.", ("productId",))])
    if not warehouse_found:
        raise ProblemsError([Problem("NOT_FOUND", "No such warehouse.", ("warehouseId",))])
    level = await repo.lock_or_create_level(conn, product_id, warehouse_id)
    if level.on_hand + delta < level.reserved:
        raise ProblemsError(
            [
                Problem(
                    "INSUFFICIENT_STOCK",
                    f"onHand would drop to {level.on_hand + delta}, below the {level.reserved} "
                    "units reserved for open orders.",
                    ("delta",),
                )
            ]
        )
    if low_stock_threshold is not None:
        await repo.set_threshold(conn, level.id, low_stock_threshold)
    if delta:
        await record_changes(
            conn,
            [LevelChange(level.id, reason, on_hand_delta=delta, reserved_delta=0)],
        )
    log.info("stock.adjusted", level_id=level.id, delta=delta, reason=reason.value)
    return int(level.id)

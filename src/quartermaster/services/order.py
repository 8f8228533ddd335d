"""Orders: place (reserving stock, all or nothing), confirm, cancel (release), fulfil (ship)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import structlog
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from quartermaster.db.repositories import order as repo
from quartermaster.db.repositories import outbox
from quartermaster.db.repositories import product as product_repo
from quartermaster.db.repositories import stock as stock_repo
from quartermaster.enums import OrderStatus, StockChangeReason
from quartermaster.services.errors import Problem, ProblemsError
from quartermaster.services.pricing import PricedLine, price_with_tier, totals
from quartermaster.services.stock import LevelChange, allocate, record_changes

log = structlog.get_logger(__name__)

MAX_LINES = 100
MAX_QUANTITY = 10_000
MAX_KEY_LENGTH = 200


@dataclass(frozen=True)
class LineRequest:
    product_id: int
    quantity: int
    discount_percent: Decimal | None = None


def check_lines(lines: Sequence[LineRequest]) -> list[Problem]:
    """Shape rules shared by orders and quotations: 1..100 lines, sane quantities, no repeats."""
    if not lines:
        return [Problem("INVALID_INPUT", "At least one line is needed.", ("lines",))]
    if len(lines) > MAX_LINES:
        return [
            Problem("INVALID_INPUT", f"At most {MAX_LINES} lines, got {len(lines)}.", ("lines",))
        ]
    problems: list[Problem] = []
    seen: set[int] = set()
    for index, line in enumerate(lines):
        if not 1 <= line.quantity <= MAX_QUANTITY:
            problems.append(
                Problem(
                    "INVALID_INPUT",
                    f"`quantity` must be between 1 and {MAX_QUANTITY}, got {line.quantity}.",
                    ("lines", str(index), "quantity"),
                )
            )
        if line.product_id in seen:
            problems.append(
                Problem(
                    "INVALID_INPUT",
                    "The same product appears twice; put the whole quantity on one line.",
                    ("lines", str(index), "productId"),
                )
            )
        seen.add(line.product_id)
    return problems


def check_products(lines: Sequence[LineRequest], products: Mapping[int, Any]) -> None:
    """NOT_FOUND, inactive and mixed-currency lines are problems."""
    problems: list[Problem] = []
    currency: str | None = None
    mixed = False
    for index, line in enumerate(lines):
        path = ("lines", str(index), "productId")
        product = products.get(line.product_id)
        if product is None:
            problems.append(Problem("NOT_FOUND", "No such product.", path))
            continue
        if not product.active:
            problems.append(Problem("INVALID_INPUT", "This product is not for sale.", path))
        if currency is None:
            currency = product.currency
        elif product.currency != currency and not mixed:
            mixed = True  # report the first line that differs, not every one after it
            problems.append(
                Problem(
                    "INVALID_INPUT",
                    f"All lines must share one currency: this product is in {product.currency}, "
                    f"the first line in {currency}.",
                    path,
                )
            )
    if problems:
        raise ProblemsError(problems)


async def load_customer_and_products(
    conn: AsyncConnection, customer_id: int, lines: Sequence[LineRequest]
) -> tuple[Any, dict[int, Any]]:
    """The customer and the lines' products, checked; one round trip."""
    customer, products = await product_repo.customer_and_products(
        conn, customer_id, [line.product_id for line in lines]
    )
    check_customer_and_products(customer, lines, products)
    return customer, products


def check_customer_and_products(
    customer: Any, lines: Sequence[LineRequest], products: Mapping[int, Any]
) -> None:
    """NOT_FOUND for a missing customer, then the lines' product problems."""
    if customer is None:
        raise ProblemsError([Problem("NOT_FOUND", "No such customer.", ("customerId",))])
    check_products(lines, products)


def request_hash(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


async def replay_idempotent(conn: AsyncConnection, key: str | None, digest: str) -> int | None:
    """The order an earlier request with this key created, or None. Serialises same-key calls."""
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise ProblemsError(
            [
                Problem(
                    "INVALID_INPUT",
                    f"`idempotencyKey` must be 1 to {MAX_KEY_LENGTH} characters.",
                    ("idempotencyKey",),
                )
            ]
        )
    await repo.lock_idempotency_key(conn, key)
    existing = await repo.find_by_idempotency_key(conn, key)
    if existing is None:
        return None
    if existing.request_hash != digest:
        raise ProblemsError(
            [
                Problem(
                    "CONFLICT",
                    "This idempotency key was already used with a different input.",
                    ("idempotencyKey",),
                )
            ]
        )
    return int(existing.id)


async def create_order(
    conn: AsyncConnection,
    *,
    customer_id: int,
    currency: str,
    lines: Sequence[PricedLine],
    quotation_id: int | None = None,
    idempotency_key: str | None = None,
    digest: str | None = None,
    levels: Sequence[Any] | None = None,
) -> Any:
    """Insert a PENDING order and reserve every line, or raise INSUFFICIENT_STOCK for all.

    ``levels``: every stock level of the lines' products, already locked in the global order
    by the caller (else locked here). Returns the new order row."""
    if levels is None:
        levels = await stock_repo.lock_levels_of_products(conn, [line.product_id for line in lines])
    allocations, short = allocate([(line.product_id, line.quantity) for line in lines], levels)
    if short:
        available: dict[int, int] = {}
        for level in levels:
            available[level.product_id] = available.get(level.product_id, 0) + max(
                level.on_hand - level.reserved, 0
            )
        raise ProblemsError(
            [
                Problem(
                    "INSUFFICIENT_STOCK",
                    f"Only {available.get(lines[i].product_id, 0)} available, "
                    f"{lines[i].quantity} asked.",
                    ("lines", str(i), "quantity"),
                )
                for i in short
            ]
        )
    money = totals(lines)
    taken = [a for line_allocations in allocations for a in line_allocations]
    created = await repo.insert_reserved_order(
        conn,
        {
            "customer_id": customer_id,
            "currency": currency,
            "subtotal": money.subtotal,
            "discount_total": money.discount_total,
            "total": money.total,
            "quotation_id": quotation_id,
            "idempotency_key": idempotency_key,
            "request_hash": digest,
            "line_products": [line.product_id for line in lines],
            "line_quantities": [line.quantity for line in lines],
            "line_prices": [line.unit_price for line in lines],
            "line_discounts": [line.discount for line in lines],
            "line_totals": [line.line_total for line in lines],
            "alloc_levels": [a.level_id for a in taken],
            "alloc_products": [a.product_id for a in taken],
            "alloc_warehouses": [a.warehouse_id for a in taken],
            "alloc_quantities": [a.quantity for a in taken],
        },
    )
    log.info("order.placed", order_id=created.id, lines=len(lines), total=str(money.total))
    return created


async def place_order(
    conn: AsyncConnection,
    customer_id: int,
    lines: Sequence[LineRequest],
    idempotency_key: str | None,
    tier_discounts: Mapping[str, Decimal],
) -> Any:
    """The new order row, or the id of the order an earlier request with this key made."""
    problems = check_lines(lines)
    if problems:
        raise ProblemsError(problems)
    digest = request_hash(
        {
            "customer": customer_id,
            "lines": sorted([line.product_id, line.quantity] for line in lines),
        }
    )
    existing = await replay_idempotent(conn, idempotency_key, digest)
    if existing is not None:
        return existing
    # One round trip: customer, products and their stock levels, locked (a refused order
    # holds the locks only until its rollback).
    customer, products, levels = await stock_repo.order_context(
        conn, customer_id, [line.product_id for line in lines]
    )
    check_customer_and_products(customer, lines, products)
    pct = tier_discounts.get(customer.tier.value, Decimal(0))
    priced = [
        price_with_tier(line.product_id, line.quantity, products[line.product_id].unit_price, pct)
        for line in lines
    ]
    return await create_order(
        conn,
        customer_id=customer_id,
        currency=products[lines[0].product_id].currency,
        lines=priced,
        idempotency_key=idempotency_key,
        digest=digest if idempotency_key is not None else None,
        levels=levels,
    )


async def _locked_order(
    conn: AsyncConnection, order_id: int, allowed: Sequence[OrderStatus], action: str
) -> Row[Any]:
    order = await repo.lock_order(conn, order_id)
    if order is None:
        raise ProblemsError([Problem("NOT_FOUND", "No such order.", ("orderId",))])
    if order.status not in allowed:
        wanted = " or ".join(s.value for s in allowed)
        raise ProblemsError(
            [
                Problem(
                    "INVALID_STATE",
                    f"Cannot {action} an order that is {order.status.value}; it must be {wanted}.",
                    ("orderId",),
                )
            ]
        )
    return order


async def confirm_order(conn: AsyncConnection, order_id: int) -> None:
    await _locked_order(conn, order_id, (OrderStatus.PENDING,), "confirm")
    await repo.set_status(conn, order_id, OrderStatus.CONFIRMED)
    log.info("order.confirmed", order_id=order_id)


async def _move_allocations(
    conn: AsyncConnection, order_id: int, reason: StockChangeReason
) -> None:
    """Release (RELEASE) or ship (SHIPMENT) every allocation of the order."""
    rows = await stock_repo.allocations_of_order(conn, order_id)
    await stock_repo.lock_levels(conn, [r.level_id for r in rows])  # in the one global order
    shipped = reason is StockChangeReason.SHIPMENT
    changes = [
        LevelChange(
            row.level_id,
            reason,
            on_hand_delta=-row.quantity if shipped else 0,
            reserved_delta=-row.quantity,
            order_id=order_id,
        )
        for row in rows
    ]
    await record_changes(conn, changes)


async def cancel_order(conn: AsyncConnection, order_id: int, reason: str | None) -> None:
    if reason is not None and len(reason) > 500:
        raise ProblemsError(
            [Problem("INVALID_INPUT", "`reason` may be at most 500 characters.", ("reason",))]
        )
    order = await _locked_order(
        conn, order_id, (OrderStatus.PENDING, OrderStatus.CONFIRMED), "cancel"
    )
    await _move_allocations(conn, order_id, StockChangeReason.RELEASE)
    await repo.set_status(conn, order_id, OrderStatus.CANCELLED, cancel_reason=reason)
    await outbox.add_events(
        conn,
        [
            {
                "topic": "order.cancelled",
                "key": f"order:{order_id}",
                "payload": {
                    "order_id": order_id,
                    "number": order.number,
                    "customer_id": order.customer_id,
                    "reason": reason,
                },
            }
        ],
    )
    log.info("order.cancelled", order_id=order_id)


async def fulfill_order(conn: AsyncConnection, order_id: int) -> None:
    order = await _locked_order(conn, order_id, (OrderStatus.CONFIRMED,), "fulfil")
    await _move_allocations(conn, order_id, StockChangeReason.SHIPMENT)
    await repo.set_status(conn, order_id, OrderStatus.FULFILLED)
    await outbox.add_events(
        conn,
        [
            {
                "topic": "order.fulfilled",
                "key": f"order:{order_id}",
                "payload": {
                    "order_id": order_id,
                    "number": order.number,
                    "customer_id": order.customer_id,
                },
            }
        ],
    )
    log.info("order.fulfilled", order_id=order_id)

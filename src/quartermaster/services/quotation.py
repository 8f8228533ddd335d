"""Quotations: DRAFT → SENT → ACCEPTED / REJECTED / EXPIRED, and conversion into an order.

Expiry is decided at read and write time: a SENT quotation whose ``valid_until`` has passed is
EXPIRED for every reader (see ``db/repositories/quotation.py``) and every transition out of it
is INVALID_STATE; no job has to run for a client never to see SENT after expiry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from quartermaster.db.repositories import quotation as repo
from quartermaster.enums import QuotationStatus
from quartermaster.services.errors import Problem, ProblemsError
from quartermaster.services.order import (
    LineRequest,
    check_lines,
    create_order,
    load_customer_and_products,
    replay_idempotent,
    request_hash,
)
from quartermaster.services.pricing import PricedLine, price_with_percent, totals

log = structlog.get_logger(__name__)

DEFAULT_VALIDITY = timedelta(days=30)
MAX_VALIDITY = timedelta(days=3650)


def _check_percent(lines: Sequence[LineRequest]) -> list[Problem]:
    problems = []
    for index, line in enumerate(lines):
        pct = line.discount_percent
        if pct is None:
            continue
        if not Decimal(0) <= pct <= Decimal(100) or pct != pct.quantize(Decimal("0.01")):
            problems.append(
                Problem(
                    "INVALID_INPUT",
                    "`discountPercent` must be between 0 and 100 with at most 2 decimals.",
                    ("lines", str(index), "discountPercent"),
                )
            )
    return problems


def _check_valid_until(valid_until: datetime) -> list[Problem]:
    now = datetime.now(UTC)
    if valid_until <= now:
        return [Problem("INVALID_INPUT", "`validUntil` must be in the future.", ("validUntil",))]
    if valid_until > now + MAX_VALIDITY:
        return [
            Problem("INVALID_INPUT", "`validUntil` may be at most 10 years ahead.", ("validUntil",))
        ]
    return []


async def _priced_lines(
    conn: AsyncConnection,
    customer_id: int,
    lines: Sequence[LineRequest],
    tier_discounts: Mapping[str, Decimal],
) -> tuple[str, list[PricedLine]]:
    customer, products = await load_customer_and_products(conn, customer_id, lines)
    tier_pct = tier_discounts.get(customer.tier.value, Decimal(0))
    priced = [
        price_with_percent(
            line.product_id,
            line.quantity,
            products[line.product_id].unit_price,
            line.discount_percent if line.discount_percent is not None else tier_pct,
        )
        for line in lines
    ]
    return products[lines[0].product_id].currency, priced


def _line_rows(quotation_id: int, priced: Sequence[PricedLine]) -> list[dict[str, Any]]:
    return [
        {
            "quotation_id": quotation_id,
            "product_id": line.product_id,
            "quantity": line.quantity,
            "unit_price": line.unit_price,
            "discount_percent": line.discount_percent,
            "line_total": line.line_total,
        }
        for line in priced
    ]


def _money(priced: Sequence[PricedLine]) -> dict[str, Decimal]:
    money = totals(priced)
    return {
        "subtotal": money.subtotal,
        "discount_total": money.discount_total,
        "total": money.total,
    }


async def create_quotation(
    conn: AsyncConnection,
    customer_id: int,
    lines: Sequence[LineRequest],
    valid_until: datetime | None,
    tier_discounts: Mapping[str, Decimal],
) -> int:
    valid_until = valid_until or datetime.now(UTC) + DEFAULT_VALIDITY
    problems = [*check_lines(lines), *_check_percent(lines), *_check_valid_until(valid_until)]
    if problems:
        raise ProblemsError(problems)
    currency, priced = await _priced_lines(conn, customer_id, lines, tier_discounts)
    quotation_id = await repo.next_quotation_id(conn)
    await repo.insert_quotation(
        conn,
        {
            "id": quotation_id,
            "number": repo.quotation_number(quotation_id),
            "customer_id": customer_id,
            "status": QuotationStatus.DRAFT,
            "currency": currency,
            "valid_until": valid_until,
            **_money(priced),
        },
    )
    await repo.replace_lines(conn, quotation_id, _line_rows(quotation_id, priced))
    log.info("quotation.created", quotation_id=quotation_id, lines=len(priced))
    return quotation_id


def _effective_status(quotation: Any) -> QuotationStatus:
    status: QuotationStatus = quotation.status
    if status is QuotationStatus.SENT and quotation.valid_until <= datetime.now(UTC):
        return QuotationStatus.EXPIRED
    return status


async def _locked(
    conn: AsyncConnection, quotation_id: int, allowed: QuotationStatus, action: str
) -> Any:
    quotation = await repo.lock_quotation(conn, quotation_id)
    if quotation is None:
        raise ProblemsError([Problem("NOT_FOUND", "No such quotation.", ("quotationId",))])
    status = _effective_status(quotation)
    if status is not allowed:
        raise ProblemsError(
            [
                Problem(
                    "INVALID_STATE",
                    f"Cannot {action} a quotation that is {status.value}; it must be "
                    f"{allowed.value}.",
                    ("quotationId",),
                )
            ]
        )
    return quotation


async def update_quotation(
    conn: AsyncConnection,
    quotation_id: int,
    lines: Sequence[LineRequest] | None,
    valid_until: datetime | None,
    tier_discounts: Mapping[str, Decimal],
) -> None:
    problems: list[Problem] = []
    if lines is not None:
        problems += [*check_lines(lines), *_check_percent(lines)]
    if valid_until is not None:
        problems += _check_valid_until(valid_until)
    if problems:
        raise ProblemsError(problems)
    quotation = await _locked(conn, quotation_id, QuotationStatus.DRAFT, "edit")
    values: dict[str, Any] = {}
    if valid_until is not None:
        values["valid_until"] = valid_until
    if lines is not None:
        currency, priced = await _priced_lines(conn, quotation.customer_id, lines, tier_discounts)
        await repo.replace_lines(conn, quotation_id, _line_rows(quotation_id, priced))
        values.update(currency=currency, **_money(priced))
    await repo.update_quotation(conn, quotation_id, **values)
    log.info("quotation.updated", quotation_id=quotation_id, fields=sorted(values))


async def send_quotation(conn: AsyncConnection, quotation_id: int) -> None:
    quotation = await _locked(conn, quotation_id, QuotationStatus.DRAFT, "send")
    if quotation.valid_until <= datetime.now(UTC):
        raise ProblemsError(
            [
                Problem(
                    "INVALID_STATE",
                    "Its validUntil has passed: set a new one with updateQuotation first.",
                    ("quotationId",),
                )
            ]
        )
    await repo.update_quotation(conn, quotation_id, status=QuotationStatus.SENT)
    log.info("quotation.sent", quotation_id=quotation_id)


async def reject_quotation(conn: AsyncConnection, quotation_id: int) -> None:
    await _locked(conn, quotation_id, QuotationStatus.SENT, "reject")
    await repo.update_quotation(conn, quotation_id, status=QuotationStatus.REJECTED)
    log.info("quotation.rejected", quotation_id=quotation_id)


async def accept_quotation(
    conn: AsyncConnection, quotation_id: int, idempotency_key: str | None
) -> Any:
    """Convert into an order at the quoted prices; returns the order row (or, for a repeated
    idempotency key, the id of the order made the first time)."""
    digest = request_hash({"quotation": quotation_id})
    existing = await replay_idempotent(conn, idempotency_key, digest)
    if existing is not None:
        return existing
    quotation = await _locked(conn, quotation_id, QuotationStatus.SENT, "accept")
    priced = [
        PricedLine(
            product_id=line.product_id,
            quantity=line.quantity,
            unit_price=line.unit_price,
            discount=line.unit_price * line.quantity - line.line_total,
            line_total=line.line_total,
            discount_percent=line.discount_percent,
        )
        for line in await repo.lines_of(conn, quotation_id)
    ]
    order = await create_order(
        conn,
        customer_id=quotation.customer_id,
        currency=quotation.currency,
        lines=priced,
        quotation_id=quotation_id,
        idempotency_key=idempotency_key,
        digest=digest if idempotency_key is not None else None,
    )
    await repo.update_quotation(conn, quotation_id, status=QuotationStatus.ACCEPTED)
    log.info("quotation.accepted", quotation_id=quotation_id, order_id=order.id)
    return order

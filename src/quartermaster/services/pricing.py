"""Money arithmetic. One rounding rule: ROUND_HALF_UP to cents, applied once per line.

- order line: discount = round(quantity × unitPrice × tier% / 100); lineTotal = quantity ×
  unitPrice − discount
- quotation line: lineTotal = round(quantity × unitPrice × (100 − discountPercent) / 100);
  its discount is quantity × unitPrice − lineTotal
- document: subtotal = Σ quantity × unitPrice, discountTotal = Σ discount,
  total = subtotal − discountTotal = Σ lineTotal (exact, because every term has two decimals)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

CENT = Decimal("0.01")
HUNDRED = Decimal(100)


def round_money(value: Decimal) -> Decimal:
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


@dataclass(frozen=True)
class PricedLine:
    product_id: int
    quantity: int
    unit_price: Decimal
    discount: Decimal
    line_total: Decimal
    discount_percent: Decimal = Decimal(0)

    @property
    def gross(self) -> Decimal:
        return self.unit_price * self.quantity


def price_with_tier(
    product_id: int, quantity: int, unit_price: Decimal, tier_pct: Decimal
) -> PricedLine:
    gross = unit_price * quantity
    discount = round_money(gross * tier_pct / HUNDRED)
    return PricedLine(product_id, quantity, unit_price, discount, gross - discount, tier_pct)


def price_with_percent(
    product_id: int, quantity: int, unit_price: Decimal, percent: Decimal
) -> PricedLine:
    gross = unit_price * quantity
    total = round_money(gross * (HUNDRED - percent) / HUNDRED)
    return PricedLine(product_id, quantity, unit_price, gross - total, total, percent)


@dataclass(frozen=True)
class Totals:
    subtotal: Decimal
    discount_total: Decimal
    total: Decimal


def totals(lines: Iterable[PricedLine]) -> Totals:
    lines = list(lines)
    subtotal = sum((line.gross for line in lines), Decimal("0.00"))
    discount = sum((line.discount for line in lines), Decimal("0.00"))
    return Totals(round_money(subtotal), round_money(discount), round_money(subtotal - discount))

"""Input checks shared by the services; each returns Problems instead of raising."""

from __future__ import annotations

import re
from decimal import Decimal

from quartermaster.services.errors import Problem

SKU_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
MAX_PRICE = Decimal("999999999999.99")


def check_text(
    value: str | None, field: str, *, max_length: int, required: bool = True
) -> list[Problem]:
    if value is None:
        return []
    if required and not value.strip():
        return [Problem("INVALID_INPUT", f"`{field}` must not be empty.", (field,))]
    if len(value) > max_length:
        return [
            Problem("INVALID_INPUT", f"`{field}` may be at most {max_length} characters.", (field,))
        ]
    return []


def check_money(value: Decimal | None, field: str) -> list[Problem]:
    if value is None:
        return []
    if value < 0:
        return [Problem("INVALID_INPUT", f"`{field}` must not be negative.", (field,))]
    if value > MAX_PRICE:
        return [Problem("INVALID_INPUT", f"`{field}` is too large (max {MAX_PRICE}).", (field,))]
    if value != value.quantize(Decimal("0.01")):  # "1.500" is fine, "1.505" is not
        return [Problem("INVALID_INPUT", f"`{field}` may have at most 2 decimal places.", (field,))]
    return []


def check_sku(value: str) -> list[Problem]:
    if not SKU_RE.fullmatch(value):  # `$` alone would let a trailing "\n" through
        return [
            Problem(
                "INVALID_INPUT",
                "`sku` must be 1-64 characters of letters, digits, '.', '_' or '-', starting "
                "with a letter or digit.",
                ("sku",),
            )
        ]
    return []


def check_currency(value: str) -> list[Problem]:
    if not CURRENCY_RE.fullmatch(value):
        return [
            Problem("INVALID_INPUT", "`currency` must be an ISO-4217 code like EUR.", ("currency",))
        ]
    return []

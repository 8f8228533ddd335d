"""Custom scalars: money as strings (never floats) and timestamps with a UTC offset."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import strawberry


def _parse_decimal(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError('Decimal must be a string such as "19.90" (or an integer)')
    try:
        parsed = Decimal(str(value).strip())
    except InvalidOperation as exc:
        raise ValueError(f"{value!r} is not a decimal number") from exc
    if not parsed.is_finite():
        raise ValueError("Decimal must be a finite number")
    return parsed


def _serialize_decimal(value: Decimal) -> str:
    return str(value)


def _parse_datetime(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError("DateTime must be an ISO-8601 string")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an ISO-8601 timestamp") from exc
    if parsed.tzinfo is None:
        raise ValueError("DateTime must carry a UTC offset, e.g. 2026-01-31T12:00:00Z")
    return parsed


def _serialize_datetime(value: datetime) -> str:
    return value.isoformat()


DecimalScalar = strawberry.scalar(
    name="Decimal",
    description='Decimal number carried as a string, e.g. "19.90". Never a float.',
    serialize=_serialize_decimal,
    parse_value=_parse_decimal,
)

DateTimeScalar = strawberry.scalar(
    name="DateTime",
    description="ISO-8601 timestamp with a UTC offset.",
    serialize=_serialize_datetime,
    parse_value=_parse_datetime,
)

SCALAR_OVERRIDES: dict[object, Any] = {Decimal: DecimalScalar, datetime: DateTimeScalar}

"""Typed, expected mutation failures: data in the payload, not GraphQL errors."""

from __future__ import annotations

import enum

import strawberry


@strawberry.enum(name="UserErrorCode", description="Stable codes of expected mutation failures.")
class UserErrorCode(enum.Enum):
    NOT_FOUND = "NOT_FOUND"
    INVALID_INPUT = "INVALID_INPUT"
    INSUFFICIENT_STOCK = "INSUFFICIENT_STOCK"
    INVALID_STATE = "INVALID_STATE"
    CONFLICT = "CONFLICT"
    FORBIDDEN = "FORBIDDEN"


@strawberry.type(name="UserError", description="Why a mutation did not do what was asked.")
class UserError:
    code: UserErrorCode
    message: str
    field: list[str] | None = strawberry.field(
        default=None,
        description='Path to the offending input field, e.g. ["lines", "2", "quantity"].',
    )

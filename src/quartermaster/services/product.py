"""Catalogue operations: create and update products."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from quartermaster.db.repositories import product as repo
from quartermaster.services.errors import Problem, ProblemsError
from quartermaster.services.validation import check_currency, check_money, check_sku, check_text

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class NewProduct:
    sku: str
    name: str
    description: str | None
    category: str | None
    unit_price: Decimal
    currency: str
    active: bool


@dataclass(frozen=True)
class ProductChanges:
    name: str | None = None
    description: str | None = None
    category: str | None = None
    unit_price: Decimal | None = None
    active: bool | None = None
    #: Nullable columns the caller explicitly set to null.
    clear: frozenset[str] = frozenset()


async def create_product(conn: AsyncConnection, new: NewProduct) -> int:
    problems = [
        *check_sku(new.sku),
        *check_text(new.name, "name", max_length=200),
        *check_text(new.description, "description", max_length=10_000, required=False),
        *check_text(new.category, "category", max_length=100),
        *check_money(new.unit_price, "unitPrice"),
        *check_currency(new.currency),
    ]
    if problems:
        raise ProblemsError(problems)
    product_id = await repo.insert_product(
        conn,
        {
            "sku": new.sku,
            "name": new.name.strip(),
            "description": new.description,
            "category": new.category,
            "unit_price": new.unit_price,
            "currency": new.currency,
            "active": new.active,
        },
    )
    if product_id is None:
        raise ProblemsError(
            [Problem("CONFLICT", f"A product with SKU {new.sku!r} already exists.", ("sku",))]
        )
    log.info("product.created", product_id=product_id, sku=new.sku)
    return product_id


async def update_product(conn: AsyncConnection, product_id: int, changes: ProductChanges) -> None:
    problems = [
        *check_text(changes.name, "name", max_length=200),
        *check_text(changes.description, "description", max_length=10_000, required=False),
        *check_text(changes.category, "category", max_length=100),
        *check_money(changes.unit_price, "unitPrice"),
    ]
    if problems:
        raise ProblemsError(problems)
    values: dict[str, object] = {
        key: value
        for key, value in (
            ("name", changes.name.strip() if changes.name is not None else None),
            ("description", changes.description),
            ("category", changes.category),
            ("unit_price", changes.unit_price),
            ("active", changes.active),
        )
        if value is not None
    }
    values.update({name: None for name in changes.clear})
    if not await repo.update_product(conn, product_id, values):
        raise ProblemsError([Problem("NOT_FOUND", "No such product.", ("productId",))])
    log.info("product.updated", product_id=product_id, fields=sorted(values))

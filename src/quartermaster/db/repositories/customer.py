from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Select, Table, or_, select

from quartermaster.db.models import Customer
from quartermaster.db.pagination import Sort
from quartermaster.db.repositories import escape_like
from quartermaster.enums import CustomerTier

customers = cast(Table, Customer.__table__)

CUSTOMER_SORT = Sort(tag="customers:name", columns=(customers.c.name, customers.c.id))


@dataclass(frozen=True)
class CustomerFilterSpec:
    search: str | None = None
    tier: CustomerTier | None = None


def select_customers(spec: CustomerFilterSpec | None) -> Select[Any]:
    stmt = select(customers)
    if spec is None:
        return stmt
    if spec.search:
        pattern = f"%{escape_like(spec.search)}%"
        stmt = stmt.where(
            or_(
                customers.c.name.ilike(pattern, escape="\\"),
                customers.c.email.ilike(pattern, escape="\\"),
            )
        )
    if spec.tier is not None:
        stmt = stmt.where(customers.c.tier == spec.tier)
    return stmt

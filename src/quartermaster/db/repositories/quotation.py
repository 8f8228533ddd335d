from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Select,
    Table,
    and_,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from quartermaster.db.models import Quotation, QuotationLine
from quartermaster.db.pagination import Sort
from quartermaster.enums import QuotationStatus

quotations = cast(Table, Quotation.__table__)
quotation_lines = cast(Table, QuotationLine.__table__)


def quotation_sort(scope: str = "quotations") -> Sort:
    return Sort(
        tag=f"{scope}:CREATED_AT:desc",
        columns=(quotations.c.created_at, quotations.c.id),
        descending=True,
    )


@dataclass(frozen=True)
class QuotationFilterSpec:
    statuses: list[QuotationStatus] | None = None
    customer_id: int | None = None


def _status_condition(status: QuotationStatus) -> ColumnElement[bool]:
    # A SENT quotation past validUntil reads as EXPIRED everywhere, even before a job flips it.
    expired = and_(
        quotations.c.status == QuotationStatus.SENT, quotations.c.valid_until <= func.now()
    )
    if status is QuotationStatus.EXPIRED:
        return or_(quotations.c.status == QuotationStatus.EXPIRED, expired)
    if status is QuotationStatus.SENT:
        return and_(
            quotations.c.status == QuotationStatus.SENT, quotations.c.valid_until > func.now()
        )
    return quotations.c.status == status


def select_quotations(spec: QuotationFilterSpec | None) -> Select[Any]:
    stmt = select(quotations)
    if spec is None:
        return stmt
    if spec.statuses is not None:
        stmt = stmt.where(or_(*[_status_condition(s) for s in spec.statuses]))
    if spec.customer_id is not None:
        stmt = stmt.where(quotations.c.customer_id == spec.customer_id)
    return stmt


# -- writes


async def next_quotation_id(conn: AsyncConnection) -> int:
    sequence = text("pg_get_serial_sequence('quotations', 'id')")
    return int((await conn.execute(select(func.nextval(sequence)))).scalar_one())


def quotation_number(quotation_id: int) -> str:
    return f"QT-{quotation_id:06d}"


async def insert_quotation(conn: AsyncConnection, values: dict[str, Any]) -> None:
    await conn.execute(insert(quotations).values(**values))


async def replace_lines(
    conn: AsyncConnection, quotation_id: int, rows: list[dict[str, Any]]
) -> None:
    await conn.execute(
        delete(quotation_lines).where(quotation_lines.c.quotation_id == quotation_id)
    )
    await conn.execute(insert(quotation_lines), rows)


async def lock_quotation(conn: AsyncConnection, quotation_id: int) -> Any:
    stmt = select(quotations).where(quotations.c.id == quotation_id).with_for_update()
    return (await conn.execute(stmt)).first()


async def lines_of(conn: AsyncConnection, quotation_id: int) -> list[Any]:
    stmt = (
        select(quotation_lines)
        .where(quotation_lines.c.quotation_id == quotation_id)
        .order_by(quotation_lines.c.id)
    )
    return list((await conn.execute(stmt)).all())


async def update_quotation(conn: AsyncConnection, quotation_id: int, **values: Any) -> None:
    await conn.execute(
        update(quotations)
        .where(quotations.c.id == quotation_id)
        .values(updated_at=func.now(), **values)
    )

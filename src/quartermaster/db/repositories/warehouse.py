from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import Row, Select, Table, select
from sqlalchemy.ext.asyncio import AsyncConnection

from quartermaster.db.models import Warehouse
from quartermaster.db.pagination import Sort

warehouses = cast(Table, Warehouse.__table__)

WAREHOUSE_SORT = Sort(tag="warehouses:code", columns=(warehouses.c.code, warehouses.c.id))


#: Labels under which rows of other tables carry their warehouse (see ``warehouse_of`` users).
WAREHOUSE_LABELS = ("wh_code", "wh_name", "wh_created_at", "wh_updated_at")


def warehouse_columns() -> list[Any]:
    return [
        warehouses.c.code.label("wh_code"),
        warehouses.c.name.label("wh_name"),
        warehouses.c.created_at.label("wh_created_at"),
        warehouses.c.updated_at.label("wh_updated_at"),
    ]


def select_warehouses() -> Select[Any]:
    return select(warehouses)


async def warehouses_by_ids(conn: AsyncConnection, ids: Sequence[int]) -> Sequence[Row[Any]]:
    """Warehouse rows by id (live stock events carry only the id), unscoped: the caller is
    the server itself."""
    result = await conn.execute(select(warehouses).where(warehouses.c.id.in_(list(ids))))
    return result.all()

"""Per-request loaders (built in ``get_context``): one batched statement per relation and level.

Each batch opens its own short autocommit connection, so sibling fields resolved concurrently
never share a connection or session.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any, cast

from sqlalchemy import ColumnElement, Select, Table, select

from quartermaster.db.loaders.base import (
    Convert,
    CountByParentLoader,
    ManyByKeyLoader,
    OneByKeyLoader,
    PageByParentLoader,
)
from quartermaster.db.models import (
    Customer,
    IntegrationJob,
    Order,
    OrderLine,
    Product,
    Quotation,
    QuotationLine,
    StockAllocation,
    StockLevel,
    Warehouse,
)
from quartermaster.db.pagination import PageArgs, Sort
from quartermaster.db.replica import ReadSource
from quartermaster.db.repositories.stock import (
    allocations_with_warehouse,
    stock_levels_with_warehouse,
)

customers = cast(Table, Customer.__table__)
warehouses = cast(Table, Warehouse.__table__)
products = cast(Table, Product.__table__)
stock_levels = cast(Table, StockLevel.__table__)
orders = cast(Table, Order.__table__)
order_lines = cast(Table, OrderLine.__table__)
allocations = cast(Table, StockAllocation.__table__)
quotations = cast(Table, Quotation.__table__)
quotation_lines = cast(Table, QuotationLine.__table__)
integration_jobs = cast(Table, IntegrationJob.__table__)


#: Restricts a statement reading the named table to the rows the caller may see
#: (``quartermaster.policy.scope`` bound to the request's principal).
Scope = Callable[[str, Select[Any]], Select[Any]]


def table_name(stmt: Select[Any]) -> str:
    """The table a loader or connection statement reads (the leftmost of its FROM)."""
    for source in stmt.get_final_froms():
        while hasattr(source, "left"):
            source = source.left
        name = getattr(source, "name", None)
        if isinstance(name, str):
            return name
    raise LookupError("statement reads no table")


class Loaders:
    """All loaders of one request, created lazily on first use."""

    def __init__(
        self,
        reader: ReadSource,
        batch: bool = True,
        convert: Mapping[str, Convert] | None = None,
        scope: Scope | None = None,
    ) -> None:
        """``convert`` maps a table name to what its rows become (e.g. the GraphQL type), so
        a loaded value can be handed to the client without another await. ``scope`` filters
        every statement to the rows the caller may read, so a row someone may not see loads
        as missing (None, or absent from a list)."""
        self.reader = reader
        self.batch = batch
        self.convert = convert or {}
        self.scope = scope
        self._pages: dict[str, PageByParentLoader] = {}
        self._counts: dict[str, CountByParentLoader] = {}

    def _scoped(self, table: str, stmt: Select[Any]) -> Select[Any]:
        return self.scope(table, stmt) if self.scope is not None else stmt

    def _one(self, table: Any, column: Any, stmt: Select[Any] | None = None) -> OneByKeyLoader:
        stmt = self._scoped(table.name, stmt if stmt is not None else select(table))
        return OneByKeyLoader(
            self.reader, stmt, column, batch=self.batch, convert=self.convert.get(table.name)
        )

    def _many(
        self, table: Any, column: Any, *order_by: Any, stmt: Select[Any] | None = None
    ) -> ManyByKeyLoader:
        stmt = self._scoped(table.name, stmt if stmt is not None else select(table))
        return ManyByKeyLoader(
            self.reader,
            stmt,
            column,
            order_by,
            batch=self.batch,
            convert=self.convert.get(table.name),
        )

    # -- by primary key (also what ``node``/``nodes`` use)
    @cached_property
    def customer_by_id(self) -> OneByKeyLoader:
        return self._one(customers, customers.c.id)

    @cached_property
    def warehouse_by_id(self) -> OneByKeyLoader:
        return self._one(warehouses, warehouses.c.id)

    @cached_property
    def product_by_id(self) -> OneByKeyLoader:
        return self._one(products, products.c.id)

    @cached_property
    def stock_level_by_id(self) -> OneByKeyLoader:
        return self._one(stock_levels, stock_levels.c.id, stock_levels_with_warehouse())

    @cached_property
    def order_by_id(self) -> OneByKeyLoader:
        return self._one(orders, orders.c.id)

    @cached_property
    def order_line_by_id(self) -> OneByKeyLoader:
        return self._one(order_lines, order_lines.c.id)

    @cached_property
    def quotation_by_id(self) -> OneByKeyLoader:
        return self._one(quotations, quotations.c.id)

    @cached_property
    def quotation_line_by_id(self) -> OneByKeyLoader:
        return self._one(quotation_lines, quotation_lines.c.id)

    @cached_property
    def integration_job_by_id(self) -> OneByKeyLoader:
        return self._one(integration_jobs, integration_jobs.c.id)

    # -- by natural key
    @cached_property
    def product_by_sku(self) -> OneByKeyLoader:
        return self._one(products, products.c.sku)

    @cached_property
    def order_by_number(self) -> OneByKeyLoader:
        return self._one(orders, orders.c.number)

    @cached_property
    def order_by_quotation(self) -> OneByKeyLoader:
        return self._one(orders, orders.c.quotation_id)

    # -- one-to-many
    @cached_property
    def stock_levels_by_product(self) -> ManyByKeyLoader:
        return self._many(
            stock_levels,
            stock_levels.c.product_id,
            stock_levels.c.warehouse_id,
            stmt=stock_levels_with_warehouse(),
        )

    @cached_property
    def order_lines_by_order(self) -> ManyByKeyLoader:
        return self._many(order_lines, order_lines.c.order_id, order_lines.c.id)

    @cached_property
    def allocations_by_order_line(self) -> ManyByKeyLoader:
        return self._many(
            allocations,
            allocations.c.order_line_id,
            allocations.c.warehouse_id,
            stmt=allocations_with_warehouse(),
        )

    @cached_property
    def quotation_lines_by_quotation(self) -> ManyByKeyLoader:
        return self._many(quotation_lines, quotation_lines.c.quotation_id, quotation_lines.c.id)

    @cached_property
    def integration_jobs_by_order(self) -> ManyByKeyLoader:
        return self._many(integration_jobs, integration_jobs.c.order_id, integration_jobs.c.id)

    # -- nested connections: one loader per distinct (connection, arguments)
    def page_by_parent(
        self,
        name: str,
        base: Select[Any],
        parent_column: ColumnElement[Any],
        sort: Sort,
        args: PageArgs,
        spec: object = None,
    ) -> PageByParentLoader:
        key = repr((name, sort.tag, args, spec))
        loader = self._pages.get(key)
        if loader is None:
            loader = PageByParentLoader(
                self.reader,
                self._scoped(table_name(base), base),
                parent_column,
                sort,
                args,
                batch=self.batch,
            )
            self._pages[key] = loader
        return loader

    def count_by_parent(
        self, name: str, base: Select[Any], parent_column: ColumnElement[Any], spec: object = None
    ) -> CountByParentLoader:
        key = repr((name, spec))
        loader = self._counts.get(key)
        if loader is None:
            loader = CountByParentLoader(
                self.reader, self._scoped(table_name(base), base), parent_column, batch=self.batch
            )
            self._counts[key] = loader
        return loader

"""Who may see and do what: the one place access control is decided.

Three kinds of rule, all here, each enforced by one mechanism:

- **Fields** (``field_allowed``): which root fields, mutations and object fields a role may
  select at all. Checked on the parsed document before any resolver runs (the ``AccessPolicy``
  schema extension), so a refused operation costs no database work.
- **Rows** (``scope``): which rows of a table a role may read. Applied as a ``WHERE`` to every
  statement that reads rows for the API — the per-request loaders (so ``node``/``nodes`` and every
  nested field) and the root connections — so someone else's row is simply not found.
- **Writes**: which mutations a role may use at all is a field rule (above). What a customer may
  write to is decided by the same two mechanisms plus one check: ``customer_target`` (they
  place orders for themselves only, ``FORBIDDEN`` otherwise), and the row scope — a mutation on
  an existing object (accepting a quotation) first reads it through ``scope``
  (``resolvers/common.py: require_visible``), so someone else's is ``NOT_FOUND``, exactly like
  an id that does not exist.

Staff are not slowed down by any of this: their scope adds no SQL, and the field check is a set
lookup per selected field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, false, select

from quartermaster.auth import Principal, Role
from quartermaster.db.loaders import (
    allocations,
    customers,
    order_lines,
    orders,
    quotation_lines,
    quotations,
)

#: The catalogue: readable by customers, and by anonymous callers when QM_PUBLIC_CATALOGUE is on.
CATALOGUE_TABLES = frozenset({"products", "warehouses", "stock_levels"})
CATALOGUE_ROOTS = frozenset({"products", "productBySku", "warehouses", "stockLevels", "node",
                             "nodes"})  # fmt: skip

#: Mutations per role (ADMIN may do everything).
CUSTOMER_MUTATIONS = frozenset({"placeOrder", "acceptQuotation", "rejectQuotation"})
STAFF_MUTATIONS = frozenset({
    "adjustStock", "placeOrder", "confirmOrder", "cancelOrder", "fulfillOrder",
    "createQuotation", "updateQuotation", "sendQuotation", "rejectQuotation", "acceptQuotation",
})  # fmt: skip

#: Object fields a customer may not select: stock internals (they see availability only) and
#: the back office's integration jobs.
CUSTOMER_HIDDEN_FIELDS = frozenset({
    ("StockLevel", "onHand"), ("StockLevel", "reserved"), ("StockLevel", "lowStockThreshold"),
    ("StockChangeEvent", "onHandDelta"), ("StockChangeEvent", "reservedDelta"),
    ("Order", "integrations"),
})  # fmt: skip


@dataclass(frozen=True)
class Refusal:
    code: str  # UNAUTHENTICATED or FORBIDDEN
    message: str


def field_allowed(
    principal: Principal, parent: str, field: str, *, public_catalogue: bool = False
) -> Refusal | None:
    """None when ``principal`` may select ``parent.field``; else why not."""
    role = principal.role
    if role is Role.ADMIN or field.startswith("__"):
        return None
    if parent == "Query":
        if field == "viewer":
            return None
        if role is Role.ANONYMOUS:
            if public_catalogue and field in CATALOGUE_ROOTS:
                return None
            return Refusal("UNAUTHENTICATED", f"Sign in to read `{field}`.")
        return None
    if parent == "Mutation":
        if role is Role.ANONYMOUS:
            return Refusal("UNAUTHENTICATED", f"Sign in to use `{field}`.")
        allowed = STAFF_MUTATIONS if role is Role.STAFF else CUSTOMER_MUTATIONS
        if field not in allowed:
            return Refusal("FORBIDDEN", f"Your role ({role.value}) may not use `{field}`.")
        return None
    if parent == "Subscription":
        if role is Role.ANONYMOUS and not public_catalogue:
            return Refusal("UNAUTHENTICATED", f"Sign in to subscribe to `{field}`.")
        return None
    if role in (Role.CUSTOMER, Role.ANONYMOUS) and (parent, field) in CUSTOMER_HIDDEN_FIELDS:
        return Refusal("FORBIDDEN", f"`{parent}.{field}` is for staff only.")
    return None


def scope(
    principal: Principal, table: str, stmt: Select[Any], *, public_catalogue: bool = False
) -> Select[Any]:
    """``stmt`` (reading ``table``) restricted to the rows ``principal`` may see."""
    role = principal.role
    if role in (Role.ADMIN, Role.STAFF):
        return stmt
    if table in CATALOGUE_TABLES and (role is Role.CUSTOMER or public_catalogue):
        return stmt
    if role is not Role.CUSTOMER or principal.customer_id is None:
        return stmt.where(false())
    cid = principal.customer_id
    if table == "customers":
        return stmt.where(customers.c.id == cid)
    if table == "orders":
        return stmt.where(orders.c.customer_id == cid)
    if table == "quotations":
        return stmt.where(quotations.c.customer_id == cid)
    own_orders = select(orders.c.id).where(orders.c.customer_id == cid)
    if table == "order_lines":
        return stmt.where(order_lines.c.order_id.in_(own_orders))
    if table == "quotation_lines":
        own = select(quotations.c.id).where(quotations.c.customer_id == cid)
        return stmt.where(quotation_lines.c.quotation_id.in_(own))
    if table == "stock_allocations":
        own_lines = select(order_lines.c.id).where(order_lines.c.order_id.in_(own_orders))
        return stmt.where(allocations.c.order_line_id.in_(own_lines))
    return stmt.where(false())  # integration_jobs and anything new: staff only until decided


def customer_target(principal: Principal, customer_id: int) -> Refusal | None:
    """May ``principal`` act for ``customer_id`` (place an order for them)?"""
    if principal.role is Role.CUSTOMER and principal.customer_id != customer_id:
        return Refusal("FORBIDDEN", "Customers can only place orders for themselves.")
    return None

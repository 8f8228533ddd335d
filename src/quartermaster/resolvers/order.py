from __future__ import annotations

from collections.abc import Awaitable, Callable

import strawberry
from sqlalchemy.ext.asyncio import AsyncConnection
from strawberry.types import Info

from quartermaster import policy
from quartermaster.context import Context
from quartermaster.db.repositories.order import select_orders
from quartermaster.resolvers.common import (
    input_id,
    line_product_ids,
    to_user_errors,
    transition,
    write_then_read,
)
from quartermaster.schema.node import awaited
from quartermaster.schema.order import (
    CancelOrderInput,
    OrderFilter,
    OrderIdInput,
    OrderLineInput,
    OrderOrder,
    OrderPayload,
    OrderType,
    PlaceOrderInput,
    order_sort_of,
)
from quartermaster.schema.pagination import Connection, page_args, root_connection
from quartermaster.services import order as service
from quartermaster.services.errors import Problem, ProblemsError
from quartermaster.services.order import LineRequest


@strawberry.type
class OrderQuery:
    @strawberry.field(description="Orders, newest first unless `orderBy` says otherwise.")
    async def orders(
        self,
        info: Info[Context, None],
        first: int | None = None,
        after: str | None = None,
        last: int | None = None,
        before: str | None = None,
        filter: OrderFilter | None = None,
        order_by: OrderOrder | None = None,
    ) -> Connection[OrderType]:
        ctx = info.context
        args = page_args(ctx, first, after, last, before)
        base = select_orders(filter.to_spec() if filter is not None else None)
        return await root_connection(ctx, base, order_sort_of(order_by), args, OrderType.from_row)

    @strawberry.field(description="An order by its number (e.g. SO-000123), or null.")
    def order_by_number(self, info: Info[Context, None], number: str) -> OrderType | None:
        return awaited(info.context.loaders.order_by_number.load(number))


def line_requests(lines: list[OrderLineInput]) -> list[LineRequest]:
    return [
        LineRequest(product_id=pid, quantity=line.quantity)
        for pid, line in zip(line_product_ids(lines), lines, strict=True)
    ]


async def _transition(
    ctx: Context, order_id: str, work: Callable[[AsyncConnection, int], Awaitable[None]]
) -> OrderPayload:
    try:
        order = await transition(ctx, order_id, "Order", "orders", work)
    except ProblemsError as exc:
        return OrderPayload(order=None, errors=to_user_errors(exc.problems))
    return OrderPayload(order=order, errors=[])


@strawberry.type
class OrderMutation:
    @strawberry.mutation(
        description="Reserves stock for every line (all or nothing) and enqueues invoice, "
        "shop-sync and notification work."
    )
    async def place_order(self, info: Info[Context, None], input: PlaceOrderInput) -> OrderPayload:
        ctx = info.context
        discounts = ctx.settings.pricing.tier_discounts
        try:
            customer_id = input_id(input.customer_id, "Customer", "customerId")
            refusal = policy.customer_target(ctx.principal, customer_id)
            if refusal is not None:
                raise ProblemsError([Problem(refusal.code, refusal.message, ("customerId",))])
            lines = line_requests(input.lines)
            order = await write_then_read(
                ctx,
                lambda conn: service.place_order(
                    conn, customer_id, lines, input.idempotency_key, discounts
                ),
                "orders",
            )
        except ProblemsError as exc:
            return OrderPayload(order=None, errors=to_user_errors(exc.problems))
        return OrderPayload(order=order, errors=[])

    @strawberry.mutation(description="PENDING → CONFIRMED.")
    async def confirm_order(self, info: Info[Context, None], input: OrderIdInput) -> OrderPayload:
        return await _transition(info.context, input.order_id, service.confirm_order)

    @strawberry.mutation(description="PENDING or CONFIRMED → CANCELLED; releases the reservations.")
    async def cancel_order(
        self, info: Info[Context, None], input: CancelOrderInput
    ) -> OrderPayload:
        async def cancel(conn: AsyncConnection, order_id: int) -> None:
            await service.cancel_order(conn, order_id, input.reason)

        return await _transition(info.context, input.order_id, cancel)

    @strawberry.mutation(
        description="CONFIRMED → FULFILLED. Ships: onHand and reserved both drop by the "
        "allocated quantities."
    )
    async def fulfill_order(self, info: Info[Context, None], input: OrderIdInput) -> OrderPayload:
        return await _transition(info.context, input.order_id, service.fulfill_order)

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import strawberry
from sqlalchemy.ext.asyncio import AsyncConnection
from strawberry.types import Info

from quartermaster.context import Context
from quartermaster.db.repositories.quotation import quotation_sort, select_quotations
from quartermaster.resolvers.common import (
    input_id,
    line_product_ids,
    require_visible,
    to_user_errors,
    transition,
    write_then_read,
)
from quartermaster.schema.order import OrderPayload
from quartermaster.schema.pagination import Connection, page_args, root_connection
from quartermaster.schema.quotation import (
    AcceptQuotationInput,
    CreateQuotationInput,
    QuotationFilter,
    QuotationIdInput,
    QuotationLineInput,
    QuotationPayload,
    QuotationType,
    UpdateQuotationInput,
)
from quartermaster.services import quotation as service
from quartermaster.services.errors import ProblemsError
from quartermaster.services.order import LineRequest


@strawberry.type
class QuotationQuery:
    @strawberry.field(description="Quotations, newest first.")
    async def quotations(
        self,
        info: Info[Context, None],
        first: int | None = None,
        after: str | None = None,
        last: int | None = None,
        before: str | None = None,
        filter: QuotationFilter | None = None,
    ) -> Connection[QuotationType]:
        ctx = info.context
        args = page_args(ctx, first, after, last, before)
        base = select_quotations(filter.to_spec() if filter is not None else None)
        return await root_connection(ctx, base, quotation_sort(), args, QuotationType.from_row)


def quotation_lines(lines: list[QuotationLineInput]) -> list[LineRequest]:
    return [
        LineRequest(pid, line.quantity, line.discount_percent)
        for pid, line in zip(line_product_ids(lines), lines, strict=True)
    ]


async def _transition(
    ctx: Context, quotation_id: str, work: Callable[[AsyncConnection, int], Awaitable[None]]
) -> QuotationPayload:
    try:
        quotation = await transition(ctx, quotation_id, "Quotation", "quotations", work)
    except ProblemsError as exc:
        return QuotationPayload(quotation=None, errors=to_user_errors(exc.problems))
    return QuotationPayload(quotation=quotation, errors=[])


@strawberry.type
class QuotationMutation:
    @strawberry.mutation(
        description="Creates a DRAFT quotation. A line's discountPercent defaults to the "
        "customer's tier discount; validUntil defaults to 30 days from now."
    )
    async def create_quotation(
        self, info: Info[Context, None], input: CreateQuotationInput
    ) -> QuotationPayload:
        ctx = info.context
        discounts = ctx.settings.pricing.tier_discounts
        try:
            customer_id = input_id(input.customer_id, "Customer", "customerId")
            lines = quotation_lines(input.lines)
            quotation = await write_then_read(
                ctx,
                lambda conn: service.create_quotation(
                    conn, customer_id, lines, input.valid_until, discounts
                ),
                "quotations",
            )
        except ProblemsError as exc:
            return QuotationPayload(quotation=None, errors=to_user_errors(exc.problems))
        return QuotationPayload(quotation=quotation, errors=[])

    @strawberry.mutation(
        description="Edits a DRAFT quotation: new lines (repriced), new validUntil."
    )
    async def update_quotation(
        self, info: Info[Context, None], input: UpdateQuotationInput
    ) -> QuotationPayload:
        discounts = info.context.settings.pricing.tier_discounts
        lines = input.lines

        async def work(conn: AsyncConnection, pk: int) -> None:
            await service.update_quotation(
                conn,
                pk,
                quotation_lines(lines) if lines is not None else None,
                input.valid_until,
                discounts,
            )

        return await _transition(info.context, input.quotation_id, work)

    @strawberry.mutation(description="DRAFT → SENT (validUntil must still be ahead).")
    async def send_quotation(
        self, info: Info[Context, None], input: QuotationIdInput
    ) -> QuotationPayload:
        return await _transition(info.context, input.quotation_id, service.send_quotation)

    @strawberry.mutation(description="SENT → REJECTED.")
    async def reject_quotation(
        self, info: Info[Context, None], input: QuotationIdInput
    ) -> QuotationPayload:
        return await _transition(info.context, input.quotation_id, service.reject_quotation)

    @strawberry.mutation(
        description="Converts a SENT, unexpired quotation into an order at the quoted prices "
        "(reserves stock like placeOrder)."
    )
    async def accept_quotation(
        self, info: Info[Context, None], input: AcceptQuotationInput
    ) -> OrderPayload:
        ctx = info.context
        try:
            pk = input_id(input.quotation_id, "Quotation", "quotationId")

            async def accept(conn: AsyncConnection) -> Any:
                await require_visible(ctx, conn, "quotations", pk, "quotationId")
                return await service.accept_quotation(conn, pk, input.idempotency_key)

            order = await write_then_read(ctx, accept, "orders")
        except ProblemsError as exc:
            return OrderPayload(order=None, errors=to_user_errors(exc.problems))
        return OrderPayload(order=order, errors=[])

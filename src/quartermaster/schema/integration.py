from __future__ import annotations

from datetime import datetime
from typing import Any

import strawberry
from sqlalchemy.engine import Row

from quartermaster.schema.enums import IntegrationKind, IntegrationStatus
from quartermaster.schema.errors import UserError
from quartermaster.schema.node import Node, encode_id


@strawberry.type(
    name="IntegrationJob",
    description="Partner work caused by an order: an invoice, a shop sync or a notification.",
)
class IntegrationJobType(Node):
    pk: strawberry.Private[int]
    kind: IntegrationKind
    status: IntegrationStatus
    attempts: int = strawberry.field(description="Delivery attempts so far.")
    last_error: str | None = strawberry.field(description="Error of the last failed attempt.")
    external_ref: str | None = strawberry.field(
        description="Identifier returned by the partner system, e.g. the invoice number."
    )
    next_attempt_at: datetime | None = strawberry.field(
        description="When a FAILED job's next automatic attempt is due."
    )
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Row[Any]) -> IntegrationJobType:
        return cls(
            id=encode_id("IntegrationJob", row.id),
            pk=row.id,
            kind=row.kind,
            status=row.status,
            attempts=row.attempts,
            last_error=row.last_error,
            external_ref=row.external_ref,
            next_attempt_at=row.next_attempt_at,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


@strawberry.input(name="IntegrationJobIdInput")
class IntegrationJobIdInput:
    job_id: strawberry.ID


@strawberry.type(name="IntegrationJobPayload")
class IntegrationJobPayload:
    job: IntegrationJobType | None
    errors: list[UserError]

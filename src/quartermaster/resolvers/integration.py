from __future__ import annotations

import strawberry
from strawberry.types import Info

from quartermaster.context import Context
from quartermaster.errors import NotImplementedYetError
from quartermaster.schema.integration import IntegrationJobIdInput, IntegrationJobPayload


@strawberry.type
class IntegrationMutation:
    @strawberry.mutation(description="Puts a FAILED or DEAD job back on its stream.")
    async def retry_integration_job(
        self, info: Info[Context, None], input: IntegrationJobIdInput
    ) -> IntegrationJobPayload:
        raise NotImplementedYetError(
            "retryIntegrationJob arrives with the integration pipeline (issue #4)."
        )

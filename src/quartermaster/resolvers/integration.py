from __future__ import annotations

import strawberry
from sqlalchemy.ext.asyncio import AsyncConnection
from strawberry.types import Info

from quartermaster.context import Context
from quartermaster.resolvers.common import input_id, to_user_errors, write_then_read
from quartermaster.schema.integration import IntegrationJobIdInput, IntegrationJobPayload
from quartermaster.services import integration as service
from quartermaster.services.errors import ProblemsError


@strawberry.type
class IntegrationMutation:
    @strawberry.mutation(
        description="Puts a FAILED or DEAD job back on its stream (status PENDING, attempts "
        "from 0 again). Enqueued through the outbox, so it survives a Redis outage."
    )
    async def retry_integration_job(
        self, info: Info[Context, None], input: IntegrationJobIdInput
    ) -> IntegrationJobPayload:
        try:
            job_id = input_id(input.job_id, "IntegrationJob", "jobId")

            async def retry(conn: AsyncConnection) -> object:
                return await service.retry_job(conn, job_id)

            job = await write_then_read(info.context, retry, "integration_jobs")
        except ProblemsError as exc:
            return IntegrationJobPayload(job=None, errors=to_user_errors(exc.problems))
        return IntegrationJobPayload(job=job, errors=[])

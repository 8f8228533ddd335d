"""What a worker reads and writes per job, batched across the jobs in flight.

Every job of a stream read asks for its row at the same moment, and most of them then ask for
their order or their products: :class:`JobStore` answers each kind of question for all of them
with one statement (one pool checkout), and folds the outcomes of jobs that finish within
``write_window_s`` of each other into one ``UPDATE`` and one ``XACK`` per stream. Reads are never
cached: every batch reads the rows as they are now (a late or repeated job pushes the current
availability, and sees that its job already succeeded).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from quartermaster.db.engine import Database
from quartermaster.db.repositories import integration as repo
from quartermaster.services.integration import InvoiceData
from quartermaster.streams import WORKER_GROUP
from quartermaster.workers.batching import Batcher

#: How long a finished job's outcome waits for others to share its UPDATE and XACK.
WRITE_WINDOW_S = 0.002


class JobStore:
    def __init__(self, db: Database, redis: Redis, *, write_window_s: float = WRITE_WINDOW_S):
        self.db = db
        self.redis = redis
        self.write_window_s = write_window_s
        self._jobs: Batcher[int, Any] = Batcher(self._load_jobs)
        self._invoices: Batcher[int, InvoiceData | None] = Batcher(self._load_invoices)
        self._availability: Batcher[tuple[int | None, int | None], list[Any]] = Batcher(
            self._load_availability
        )
        self._succeeded: Batcher[tuple[int, str | None], None] = Batcher(
            self._write_succeeded, window_s=write_window_s
        )
        self._acks: dict[str, Batcher[str, None]] = {}

    @property
    def batchers(self) -> dict[str, Batcher[Any, Any]]:
        return {
            "jobs": self._jobs,
            "invoice_data": self._invoices,
            "availability": self._availability,
            "succeeded": self._succeeded,
            **{f"ack:{s}": b for s, b in self._acks.items()},
        }

    # ------------------------------------------------------------------ the job's questions

    async def job(self, job_id: int) -> Any:
        """The job's row as it is now, or None when it does not exist."""
        return await self._jobs.submit(job_id)

    async def invoice_data(self, order_id: int) -> InvoiceData | None:
        """The order (with its customer's e-mail and name) and its lines, or None."""
        return await self._invoices.submit(order_id)

    async def products_to_sync(self, job: Any) -> list[Any]:
        """(id, sku, available) of the products a SHOP_SYNC job pushes: its product, or every
        product of its order. Availability is read now, so the shop gets the latest figure
        even when the job runs late or twice."""
        order_id = None if job.order_id is None else int(job.order_id)
        product_id = None if job.product_id is None else int(job.product_id)
        return await self._availability.submit((order_id, product_id))

    async def succeeded(self, job_id: int, external_ref: str | None) -> None:
        """Record the job's successful attempt (a job that already succeeded stays as it is)."""
        await self._succeeded.submit((job_id, external_ref))

    async def ack(self, stream: str, entry_id: str) -> None:
        batcher = self._acks.get(stream)
        if batcher is None:

            async def flush(ids: list[str], stream: str = stream) -> list[None]:
                await self.redis.xack(stream, WORKER_GROUP, *ids)
                return [None] * len(ids)

            batcher = self._acks[stream] = Batcher(flush, window_s=self.write_window_s)
        await batcher.submit(entry_id)

    async def aclose(self) -> None:
        for batcher in self.batchers.values():
            await batcher.aclose()

    # ------------------------------------------------------------------ one statement each

    async def _load_jobs(self, ids: list[int]) -> list[Any]:
        async with self.db.reader("primary").connect() as conn:
            found = await repo.jobs_by_id(conn, ids)
        return [found.get(i) for i in ids]

    async def _load_invoices(self, order_ids: list[int]) -> list[InvoiceData | None]:
        async with self.db.reader("primary").connect() as conn:
            found = await repo.orders_for_invoice(conn, order_ids)
        return [InvoiceData(*found[i]) if i in found else None for i in order_ids]

    async def _load_availability(
        self, wanted: list[tuple[int | None, int | None]]
    ) -> list[list[Any]]:
        order_ids = [o for o, p in wanted if p is None and o is not None]
        product_ids = [p for _, p in wanted if p is not None]
        async with self.db.reader("primary").connect() as conn:
            of_order, by_id = await repo.products_to_sync(conn, order_ids, product_ids)
        return [
            ([by_id[p]] if p in by_id else [])
            if p is not None
            else of_order.get(o, [])
            if o is not None
            else []
            for o, p in wanted
        ]

    async def _write_succeeded(self, outcomes: list[tuple[int, str | None]]) -> Sequence[None]:
        async with self.db.reader("primary").connect() as conn:  # autocommit: 1 round trip
            await repo.mark_succeeded(conn, outcomes)
        return [None] * len(outcomes)

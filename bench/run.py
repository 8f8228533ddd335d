"""Read-path benchmark: the dataloader build against the N+1 build (QM_DATALOADERS=false).

Seeds a dedicated database, starts one server per build, drives each scenario with an in-process
httpx load generator at fixed concurrency, and writes bench/RESULTS.md and bench/results.json.
Not part of the test suite; see bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import orjson
import psutil

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/qm_bench"
BUILDS = {"dataloaders": "true", "N+1": "false"}

ORDERS_NESTED = """query OrdersPage { orders(first: %d) { edges { node { number customer { name }
  lines { quantity product { sku stock { available warehouse { code } } }
  allocations { quantity warehouse { code } } } } } } }"""
SCENARIOS: dict[str, str] = {
    "orders_nested": ORDERS_NESTED % 20,
    "customers_orders": "{ customers(first: 50) { edges { node { name orders(first: 5) "
    "{ edges { node { number total } } } } } } }",
    "products_page": "{ products(first: 50, orderBy: {field: PRICE, direction: DESC}) { edges "
    "{ cursor node { sku name unitPrice availableQuantity } } "
    "pageInfo { hasNextPage endCursor } } }",
    "product_by_sku": "query BySku($sku: String!) { productBySku(sku: $sku) { sku name unitPrice "
    "availableQuantity stock { available warehouse { code } } } }",
}
SWEEP_PAGES = (5, 10, 20, 50)
SCALE = {"products": 100_000, "warehouses": 10, "customers": 50_000, "orders": 200_000,
         "quotations": 20_000, "random_seed": 42}  # fmt: skip


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def plain(url: str) -> str:
    """asyncpg wants postgresql://, without SQLAlchemy's +asyncpg driver suffix."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def with_db(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def resolve_url(args: argparse.Namespace) -> tuple[str, Any]:
    """(url, embedded server or None)."""
    if args.database_url:
        return args.database_url, None
    if os.environ.get("QM_DATABASE_URL"):
        return with_db(plain(os.environ["QM_DATABASE_URL"]), "qm_bench"), None
    try:
        socket.create_connection(("127.0.0.1", 5432), 1).close()
        return DEFAULT_URL, None
    except OSError:
        pass
    from quartermaster.embedded import start_postgres

    log("no PostgreSQL configured or on :5432, starting the embedded one in .qm-data/bench")
    pg = start_postgres(ROOT / ".qm-data" / "bench", database="qm_bench")
    return plain(pg.url), pg


async def prepare_database(url: str, reuse: bool, products: int) -> bool:
    """Create the database if needed; True if it already holds the requested scale."""
    name = urlsplit(url).path.lstrip("/")
    admin = await asyncpg.connect(with_db(url, "postgres"))
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists and reuse:
            conn = await asyncpg.connect(url)
            try:
                if await conn.fetchval("SELECT to_regclass('products') IS NOT NULL"):
                    count = await conn.fetchval("SELECT count(*) FROM products")
                    if count == products:
                        return True
                    log(f"--reuse: {name} has {count} products, not {products}: re-seeding")
            finally:
                await conn.close()
        if exists:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
        return False
    finally:
        await admin.close()


def run_cli(args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    log("$ uv run quartermaster " + shlex.join(args))
    proc = subprocess.Popen(["uv", "run", "quartermaster", *args], cwd=ROOT, env=env)
    last = started
    while proc.poll() is None:
        time.sleep(0.5)
        if time.perf_counter() - last >= 30:
            last = time.perf_counter()
            log(f"  ... still running ({last - started:.0f} s)")
    if proc.returncode:
        raise SystemExit(f"`quartermaster {args[0]}` failed with exit code {proc.returncode}")
    seconds = time.perf_counter() - started
    log(f"  done in {seconds:.1f} s")
    return seconds


class Server:
    def __init__(self, build: str, url: str, logdir: Path, workers: int = 1) -> None:
        self.build, self.port = build, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.logfile = logdir / f"server-{'loaders' if build == 'dataloaders' else 'n1'}.log"
        env = {**os.environ, "QM_DATABASE_URL": url, "QM_LOG_LEVEL": "warning"}
        env["QM_DATALOADERS"] = BUILDS[build]
        cmd = ["uv", "run", "quartermaster", "serve", "--workers", str(workers), "--host",
               "127.0.0.1", "--port"]  # fmt: skip
        with self.logfile.open("wb") as out:
            self.proc = subprocess.Popen(
                [*cmd, str(self.port)], cwd=ROOT, env=env, stdout=out, stderr=out,
                start_new_session=True,
            )  # fmt: skip

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.build} server exited:\n{self.logfile.read_text()[-3000:]}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{self.build} server not healthy after {timeout} s")

    def cpu_seconds(self) -> float:
        """User+system CPU of the server's process tree (uv -> python)."""
        root = psutil.Process(self.proc.pid)
        total = 0.0
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    async def statements(self, client: httpx.AsyncClient) -> float:
        text = (await client.get(self.base + "/metrics")).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("qm_sql_statements_total{")
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def check(body: Any, status: int) -> str | None:
    if status != 200:
        return f"HTTP {status}: {str(body)[:300]}"
    if not isinstance(body, dict) or body.get("errors"):
        return f"GraphQL errors: {str(body)[:300]}"
    data = body.get("data") or {}
    if any(v is None for v in data.values()):
        return f"null result: {str(body)[:300]}"
    return None


def admin_token() -> str:
    """A bearer token for the benchmark's requests (ADMIN: every operation, no rate limit),
    signed with the secret the servers use (QM_AUTH_SECRET or the development one)."""
    from quartermaster.auth import Role, mint_token
    from quartermaster.config import Settings

    secret = Settings.from_env().access.token_secret(production=False)
    return mint_token(secret, Role.ADMIN, ttl_s=24 * 3600, subject="bench")


AUTH = {"Authorization": f"Bearer {admin_token()}"}


class RawHttp:
    """One keep-alive HTTP/1.1 connection speaking just enough HTTP for POST + JSON.

    httpx costs ~2.4 ms of CPU per request; on a 2-core machine that CPU is taken from the
    server and PostgreSQL being measured. This costs a small fraction of it.
    """

    def __init__(self, base: str) -> None:
        host_port = base.split("://", 1)[1]
        self.host, _, port = host_port.partition(":")
        self.port = int(port or 80)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_json(self, path: str, payload: Any) -> tuple[int, Any]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        body = orjson.dumps(payload)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Authorization: {AUTH['Authorization']}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, orjson.loads(await self.reader.readexactly(length))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def drive(
    client: httpx.AsyncClient, url: str, make: Any, concurrency: int, seconds: float
) -> tuple[list[float], list[str], float]:
    """Run `concurrency` workers in a loop for `seconds`; latencies (s), errors, elapsed."""
    latencies: list[float] = []
    errors: list[str] = []
    end = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < end:
            payload = make()
            t0 = time.perf_counter()
            try:
                resp = await client.post(url, json=payload)
                problem = check(resp.json(), resp.status_code)
            except (httpx.HTTPError, ValueError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            latencies.append(time.perf_counter() - t0)
            if problem:
                errors.append(problem)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def measure(
    server: Server, scenario: str, make: Any, args: argparse.Namespace
) -> dict[str, Any]:
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    async with httpx.AsyncClient(limits=limits, timeout=120, headers=AUTH) as client:
        url = server.base + "/graphql"
        _, warm_errors, _ = await drive(client, url, make, args.concurrency, args.warmup)
        stmts0, cpu0 = await server.statements(client), server.cpu_seconds()
        lat, errors, elapsed = await drive(client, url, make, args.concurrency, args.duration)
        stmts1, cpu1 = await server.statements(client), server.cpu_seconds()
    n = len(lat)
    errors = warm_errors + errors
    row = {
        "scenario": scenario, "build": server.build, "requests": n, "seconds": round(elapsed, 2),
        "rps": round(n / elapsed, 1), "p50_ms": round(pct(lat, 0.50) * 1000, 1),
        "p99_ms": round(pct(lat, 0.99) * 1000, 1), "errors": len(errors),
        "error_sample": errors[:3], "sql_per_request": round((stmts1 - stmts0) / max(n, 1), 2),
        "cpu_ms_per_request": round((cpu1 - cpu0) * 1000 / max(n, 1), 2),
    }  # fmt: skip
    log(
        f"{scenario:<17} {server.build:<11} {row['rps']:>7} req/s  p50 {row['p50_ms']} ms  "
        f"p99 {row['p99_ms']} ms  sql/req {row['sql_per_request']}  "
        f"cpu {row['cpu_ms_per_request']} ms/req  errors {row['errors']}"
    )
    return row


async def sweep(server: Server) -> dict[int, float]:
    """SQL statements of one orders page, by page size (sequential, 3 requests each)."""
    out: dict[int, float] = {}
    async with httpx.AsyncClient(timeout=120, headers=AUTH) as client:
        for first in SWEEP_PAGES:
            before = await server.statements(client)
            for _ in range(3):
                resp = await client.post(
                    server.base + "/graphql", json={"query": ORDERS_NESTED % first}
                )
                if problem := check(resp.json(), resp.status_code):
                    raise SystemExit(f"sweep first={first} on {server.build}: {problem}")
            out[first] = round((await server.statements(client) - before) / 3, 2)
    return out


async def database_facts(url: str) -> tuple[str, list[str], dict[str, int]]:
    conn = await asyncpg.connect(url)
    try:
        version = await conn.fetchval("SELECT version()")
        skus = [
            r["sku"]
            for r in await conn.fetch("SELECT sku FROM products ORDER BY random() LIMIT 2000")
        ]
        counts = {
            t: await conn.fetchval(f"SELECT count(*) FROM {t}")
            for t in ("products", "warehouses", "customers", "orders", "quotations")
        }
        return version, skus, counts
    finally:
        await conn.close()


def write_results(meta: dict[str, Any], rows: list[dict[str, Any]], sweeps: dict[str, Any]) -> None:
    (BENCH / "results.json").write_text(
        json.dumps({**meta, "results": rows, "page_size_sweep": sweeps}, indent=2) + "\n"
    )
    lines = [
        "# Benchmark results: dataloaders vs N+1",
        "",
        "Generated by `bench/run.py`; overwritten on every run (see `bench/README.md`).",
        "",
        f"- Date: {meta['date']}",
        f"- Machine: {meta['cores']} cores, {meta['platform']}, Python {meta['python']}; "
        f"load average before the run {meta['load_average_before']} (1/5/15 min)",
        f"- PostgreSQL: {meta['postgres']}",
        "- Scale: " + ", ".join(f"{k}={v}" for k, v in meta["rows"].items()),
        f"- Load: concurrency {meta['concurrency']}, {meta['duration']} s measured per "
        f"scenario and build after {meta['warmup']} s warm-up; one uvicorn worker per server",
        f"- Seeding: {meta['seed_seconds']}",
        "- Extra server settings: "
        + (", ".join(f"`{k}={v}`" for k, v in meta["env"].items()) or "none (defaults)"),
        f"- Command: `{meta['command']}`",
        "",
        "| scenario | build | req/s | p50 ms | p99 ms | SQL stmts/request "
        "| server CPU ms/request | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['build']} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} "
            f"| {r['sql_per_request']} | {r['cpu_ms_per_request']} | {r['errors']} |"
        )
    lines += [
        "",
        "SQL statements for one `orders_nested` request by page size (`orders(first: N)`):",
        "",
    ]
    lines += ["| build | " + " | ".join(f"first: {n}" for n in SWEEP_PAGES) + " |"]
    lines += ["|---|" + "---:|" * len(SWEEP_PAGES)]
    for build, by_page in sweeps.items():
        lines.append(f"| {build} | " + " | ".join(str(by_page[n]) for n in SWEEP_PAGES) + " |")
    lines += ["", "## Notes", "", *notes(rows, sweeps, meta["env"]), ""]
    (BENCH / "RESULTS.md").write_text("\n".join(lines))


def notes(rows: list[dict[str, Any]], sweeps: dict[str, Any], env: dict[str, str]) -> list[str]:
    by = {(r["scenario"], r["build"]): r for r in rows}
    out = []
    for scenario in SCENARIOS:
        lo, n1 = by.get((scenario, "dataloaders")), by.get((scenario, "N+1"))
        if lo and n1 and n1["rps"]:
            out.append(
                f"- `{scenario}`: the loader build serves {lo['rps'] / n1['rps']:.1f}x the "
                f"requests per second of the N+1 build, with {lo['sql_per_request']} vs "
                f"{n1['sql_per_request']} SQL statements per request."
            )
    lo, n1 = sweeps.get("dataloaders", {}), sweeps.get("N+1", {})
    a, b = SWEEP_PAGES[0], SWEEP_PAGES[-1]
    if lo and n1:
        out.append(
            f"- Page-size sweep: the N+1 build goes from {n1[a]} to {n1[b]} statements as the page "
            f"grows from {a} to {b} orders (statements per order, per line and per "
            "product/stock row); "
            f"the loader build goes from {lo[a]} to {lo[b]}, one batched query per level."
        )
    for r in rows:
        if r["errors"]:
            out.append(
                f"- **{r['errors']} errors** in `{r['scenario']}` / {r['build']}, e.g. "
                f"`{r['error_sample'][0][:200]}` (details in the server log)."
            )
    if "QM_DB_POOL_TIMEOUT" in env:
        from quartermaster.config import DatabaseSettings

        default = DatabaseSettings(url=None, replica_url=None)
        size = int(env.get("QM_DB_POOL_SIZE", default.pool_size))
        overflow = int(env.get("QM_DB_MAX_OVERFLOW", default.max_overflow))
        out.append(
            f"- `QM_DB_POOL_TIMEOUT={env['QM_DB_POOL_TIMEOUT']}` (default "
            f"{default.pool_timeout:g} s): the N+1 build's `orders_nested` checks out one "
            f"connection per resolver at once, so its requests queue for the {size + overflow} "
            f"pooled connections (pool {size} + overflow {overflow}), and a wait longer than the "
            "default fails with SQLAlchemy's pool `TimeoutError`; the longer wait lets it be "
            "measured without errors."
        )
    return [
        *out,
        "- Server CPU ms/request: user+system CPU of the server process tree / requests. The load "
        "generator, both servers and PostgreSQL share the machine's cores.",
        "- p50/p99 are client-side latencies at fixed concurrency (latency ≈ concurrency / "
        "throughput): a slow build's latency is mostly queueing.",
        "- Other work on the machine (a load average well above 0 before the run) lowers req/s "
        "and raises latency, but not the statement counts.",
        "- A non-200 answer, a GraphQL `errors` entry or a null result counts as an error.",
    ]


def qm_env() -> dict[str, str]:
    """QM_* settings passed through to the servers (the bench sets the database and log level)."""
    skip = ("QM_DATABASE_URL", "QM_LOG_LEVEL", "QM_DATALOADERS")
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("QM_") and k not in skip}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    for name, default in SCALE.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    p.add_argument("--database-url", default=None, help=f"default: {DEFAULT_URL}")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds per run")
    p.add_argument("--reuse", action="store_true", help="skip seeding if the scale matches")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    wall, load_before = time.perf_counter(), os.getloadavg()
    url, embedded = resolve_url(args)
    servers: list[Server] = []
    try:
        log(f"database: {url}")
        env = {**os.environ, "QM_DATABASE_URL": url, "QM_LOG_LEVEL": "warning"}
        seed_seconds = "skipped (--reuse, scale already present)"
        if not asyncio.run(prepare_database(url, args.reuse, args.products)):
            run_cli(["migrate"], env)
            seed_args = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in SCALE]
            seed_seconds = f"{run_cli(['seed', *seed_args], env):.0f} s"
        version, skus, counts = asyncio.run(database_facts(url))
        log(f"rows: {counts}")
        logdir = Path(tempfile.mkdtemp(prefix="qm-bench-"))
        for build in BUILDS:
            servers.append(Server(build, url, logdir))
        for server in servers:
            server.wait_healthy()
        log(f"servers up ({', '.join(s.base + ' ' + s.build for s in servers)}), logs in {logdir}")
        rng = random.Random(args.random_seed)

        def maker(scenario: str) -> Any:
            if scenario == "product_by_sku":
                return lambda: {
                    "query": SCENARIOS[scenario],
                    "variables": {"sku": rng.choice(skus)},
                }
            return lambda: {"query": SCENARIOS[scenario]}

        rows = [
            asyncio.run(measure(server, scenario, maker(scenario), args))
            for scenario in SCENARIOS
            for server in servers
        ]
        sweeps = {s.build: asyncio.run(sweep(s)) for s in servers}
        log(f"orders page statements by page size: {sweeps}")
        meta = {
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "postgres": version, "rows": counts,
            "concurrency": args.concurrency, "duration": args.duration, "warmup": args.warmup,
            "seed_seconds": seed_seconds, "env": qm_env(),
            "load_average_before": [round(x, 2) for x in load_before],
            "command": shlex.join([*(f"{k}={v}" for k, v in qm_env().items()), "uv", "run",
                                   "python", "bench/run.py", *sys.argv[1:]]),
        }  # fmt: skip
        write_results(meta, rows, sweeps)
        log(f"wrote bench/RESULTS.md and bench/results.json ({time.perf_counter() - wall:.0f} s)")
        failed = [r for r in rows if r["errors"]]
        for r in failed:
            print(f"ERRORS in {r['scenario']} / {r['build']}: {r['errors']}", file=sys.stderr)
            for sample in r["error_sample"]:
                print(f"    {sample}", file=sys.stderr)
        return 1 if failed else 0
    finally:
        for server in servers:
            server.stop()
        if embedded is not None:
            embedded.stop()


if __name__ == "__main__":
    sys.exit(main())

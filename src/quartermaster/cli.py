"""The ``quartermaster`` command: dev | serve | worker | outbox | sandbox | migrate | seed |
token | healthcheck | export-schema."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import click

from quartermaster.config import PARTNER_VARS, Settings

FIRST_QUERY = """\
{ orders(first: 5) { edges { node { number status total customer { name }
  lines { quantity product { sku name } } } } } }"""


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


def _require_database(settings: Settings) -> str:
    if not settings.database.url:
        raise click.ClickException(
            "QM_DATABASE_URL is not set. Use `quartermaster dev` for a self-contained demo, "
            "or point QM_DATABASE_URL at PostgreSQL."
        )
    return settings.database.url


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="quartermaster")
def main() -> None:
    """Quartermaster: GraphQL API for a B2B back office."""


@main.command()
def migrate() -> None:
    """Apply database migrations (alembic upgrade head)."""
    from quartermaster.db.migrate import upgrade

    url = _require_database(_settings())
    upgrade(url)
    click.echo("migrations: at head")


def _progress_printer() -> Callable[[str, int, int], None]:
    state: dict[str, Any] = {"table": None, "bar": None, "done": 0}

    def progress(table: str, done: int, total: int) -> None:
        if state["table"] != table:
            if state["bar"] is not None:
                state["bar"].render_finish()
            state["table"], state["done"] = table, 0
            state["bar"] = click.progressbar(length=max(total, 1), label=f"{table:<18}", width=30)
            state["bar"].render_progress()
        bar = state["bar"]
        bar.update(done - state["done"])
        state["done"] = done
        if done >= total:
            bar.render_finish()
            state["bar"], state["table"] = None, None

    return progress


def _run_seed(url: str, config: Any, show_progress: bool = True) -> dict[str, int]:
    from quartermaster.db.seed import seed_database

    progress = _progress_printer() if show_progress and sys.stderr.isatty() else None
    return asyncio.run(seed_database(url, config, progress))


@main.command()
@click.option("--products", default=2000, show_default=True, type=click.IntRange(1))
@click.option("--warehouses", default=5, show_default=True, type=click.IntRange(1, 999))
@click.option("--customers", default=300, show_default=True, type=click.IntRange(1))
@click.option("--orders", default=5000, show_default=True, type=click.IntRange(0))
@click.option("--quotations", default=1000, show_default=True, type=click.IntRange(0))
@click.option("--random-seed", default=42, show_default=True, type=int)
def seed(
    products: int, warehouses: int, customers: int, orders: int, quotations: int, random_seed: int
) -> None:
    """Fill an empty, migrated database with deterministic demo data."""
    from quartermaster.db.seed import SeedConfig

    url = _require_database(_settings())
    config = SeedConfig(
        products=products,
        warehouses=warehouses,
        customers=customers,
        orders=orders,
        quotations=quotations,
        random_seed=random_seed,
    )
    try:
        counts = _run_seed(url, config)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo("seeded: " + ", ".join(f"{table}={n}" for table, n in counts.items()))


def _run_until_signal(main_coro: Callable[[asyncio.Event], Any]) -> None:
    """Run ``main_coro(stop)``; SIGTERM or Ctrl-C set ``stop`` (a second Ctrl-C forces)."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main_coro(stop)

    with asyncio.Runner(loop_factory=_loop_factory()) as runner_:
        runner_.run(runner())


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (uvicorn[standard] brings it on Linux and
    macOS), as uvicorn uses for the API: a worker's partner calls, Redis and database round
    trips all cost less CPU on it. The standard loop elsewhere."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - e.g. Windows
        return None
    return uvloop.new_event_loop


@main.command()
@click.option(
    "--concurrency",
    type=click.IntRange(1, 1000),
    default=None,
    help="Jobs run at once [QM_WORKER_CONCURRENCY, 16]",
)
@click.option("--only-relay", is_flag=True, help="Relay the outbox to Redis; run no jobs.")
@click.option("--no-relay", is_flag=True, help="Run jobs only (another process relays).")
@click.option(
    "--metrics-port", type=int, default=None, help="Serve /metrics here [QM_WORKER_METRICS_PORT]"
)
def worker(
    concurrency: int | None, only_relay: bool, no_relay: bool, metrics_port: int | None
) -> None:
    """Relay the outbox to Redis streams and run integration jobs until SIGTERM."""
    from quartermaster.observability import configure_logging
    from quartermaster.workers.runner import run_worker

    if only_relay and no_relay:
        raise click.UsageError("--only-relay and --no-relay exclude each other")
    settings = _settings()
    _require_database(settings)
    if not settings.redis.url:
        raise click.ClickException("QM_REDIS_URL is not set.")
    for partner in PARTNER_VARS:  # production refuses unsigned or dev-signed partner calls
        try:
            settings.partners.signing_secret(partner)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
    configure_logging(settings.log_level, settings.log_json)
    port = metrics_port if metrics_port is not None else settings.jobs.metrics_port
    _run_until_signal(
        lambda stop: run_worker(
            settings, stop, concurrency=concurrency, relay=not no_relay, consume=not only_relay,
            metrics_port=port,
        )
    )  # fmt: skip


@main.group()
def outbox() -> None:
    """Outbox maintenance."""


@outbox.command()
@click.option(
    "--since", required=True, type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S",
                                                  "%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S"]),
    help="Republish events created at or after this time (UTC unless an offset is given).",
)  # fmt: skip
def replay(since: Any) -> None:
    """Publish already-published outbox rows again, e.g. after Redis lost its data.

    Jobs that succeeded or are DEAD are not enqueued again; everything else is idempotent."""
    from datetime import UTC, datetime, timedelta

    from redis.asyncio import Redis

    from quartermaster.db.engine import Database
    from quartermaster.workers.relay import replay as replay_outbox

    settings = _settings()
    _require_database(settings)
    if not settings.redis.url:
        raise click.ClickException("QM_REDIS_URL is not set.")
    if since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    retention = timedelta(hours=settings.jobs.outbox_retention_hours)
    if since < datetime.now(UTC) - retention:
        click.echo(
            f"warning: published outbox rows are kept {settings.jobs.outbox_retention_hours:g} h "
            "(QM_OUTBOX_RETENTION_HOURS); events published before "
            f"{(datetime.now(UTC) - retention).isoformat(timespec='seconds')} are deleted and "
            "cannot be replayed, nor their unfinished jobs enqueued again.",
            err=True,
        )

    async def run() -> tuple[int, int]:
        db = Database.connect(settings.database)
        redis = Redis.from_url(str(settings.redis.url))
        try:
            return await replay_outbox(db, redis, settings.jobs, since)
        finally:
            await redis.aclose()
            await db.dispose()

    events, jobs = asyncio.run(run())
    click.echo(f"replayed {events} outbox events since {since.isoformat()}; {jobs} jobs enqueued")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8100, show_default=True, type=int)
def sandbox(host: str, port: int) -> None:
    """Run the sandbox partner (invoicing, shop, notifications) for development and tests."""
    from quartermaster.integrations.sandbox import secrets_from_settings, serve_sandbox
    from quartermaster.observability import configure_logging

    settings = _settings()
    configure_logging(settings.log_level, settings.log_json)
    # The secrets the worker signs with under the same settings (the development one by default).
    try:
        secrets = secrets_from_settings(settings.partners)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"sandbox partner on http://{host}:{port} (control API under /_sandbox)")
    with asyncio.Runner(loop_factory=_loop_factory()) as runner_:
        runner_.run(serve_sandbox(host, port, secrets=secrets, gc=settings.gc))


@main.command()
@click.option(
    "--role", required=True, type=click.Choice(["ADMIN", "STAFF", "CUSTOMER"], case_sensitive=False)
)
@click.option("--customer", "customer_id", type=int, default=None, help="Customer id (CUSTOMER).")
@click.option("--ttl", default="12h", show_default=True, help="Lifetime: 3600, 15m, 12h, 7d.")
@click.option("--subject", default=None, help="Who the token is for (default: derived).")
def token(role: str, customer_id: int | None, ttl: str, subject: str | None) -> None:
    """Mint a bearer token (signed with QM_AUTH_SECRET) and print it."""
    from quartermaster.auth import Role, mint_token, parse_ttl

    settings = _settings()
    try:
        secret = settings.access.token_secret(settings.production)
        ttl_s = parse_ttl(ttl)
        value = mint_token(
            secret, Role(role.upper()), customer_id=customer_id, ttl_s=ttl_s, subject=subject
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(value)


@main.command()
@click.argument("url", required=False)
@click.option("--timeout", default=3.0, show_default=True, type=float, help="Seconds.")
def healthcheck(url: str | None, timeout: float) -> None:
    """Exit 0 when URL answers HTTP 200 (default: this API's /health/ready on QM_PORT).

    For container health checks: the runtime image has no curl."""
    import httpx

    url = url or f"http://127.0.0.1:{_settings().port}/health/ready"
    try:
        response = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"{url}: {type(exc).__name__}: {exc}") from exc
    if response.status_code != 200:
        raise click.ClickException(f"{url}: HTTP {response.status_code} {response.text[:300]}")
    click.echo(f"{url}: ok")


@main.command("export-schema")
def export_schema() -> None:
    """Print the GraphQL schema (SDL)."""
    from quartermaster.api import export_sdl

    click.echo(export_sdl(), nl=False)


@main.command()
@click.option("--host", default=None, help="Bind address [QM_HOST, 127.0.0.1]")
@click.option("--port", default=None, type=int, help="Port [QM_PORT, 8000]")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64))
def serve(host: str | None, port: int | None, workers: int) -> None:
    """Serve the API against the configured database and Redis."""
    import uvicorn

    settings = _settings()
    _require_database(settings)
    uvicorn.run(
        "quartermaster.app:create_app",
        factory=True,
        host=host or settings.host,
        port=port or settings.port,
        workers=workers,
        log_level="warning",
        access_log=False,
        ws="websockets-sansio",
    )


@contextmanager
def embedded_services(settings: Settings, replica: bool = False) -> Iterator[dict[str, str]]:
    """Start embedded PostgreSQL/Redis for whatever is not configured; stop them on exit.

    ``replica``: a primary and a streaming hot-standby replica instead of one server."""
    from quartermaster.embedded import start_postgres, start_redis, start_replicated_postgres

    overrides: dict[str, str] = {}
    with ExitStack() as stack:
        if not settings.database.url and replica:
            where = settings.data_dir / "replicated"
            click.echo(f"starting embedded PostgreSQL primary + streaming replica in {where} ...")
            pair = start_replicated_postgres(where)
            stack.callback(pair.stop)
            overrides["QM_DATABASE_URL"] = pair.primary_url
            overrides["QM_REPLICA_DATABASE_URL"] = pair.replica_url
            click.echo(f"  primary {pair.primary_url}\n  replica {pair.replica_url}")
        elif not settings.database.url:
            click.echo(f"starting embedded PostgreSQL in {settings.data_dir / 'postgres'} ...")
            pg = start_postgres(settings.data_dir)
            stack.callback(pg.stop)
            overrides["QM_DATABASE_URL"] = pg.url
        elif replica:
            click.echo("QM_DATABASE_URL is set: --replica ignored (set QM_REPLICA_DATABASE_URL)")
        if not settings.redis.url:
            click.echo(f"starting embedded Redis in {settings.data_dir / 'redis'} ...")
            redis = start_redis(settings.data_dir)
            stack.callback(redis.stop)
            overrides["QM_REDIS_URL"] = redis.url
        yield overrides


async def _demo_tokens(settings: Settings, url: str) -> dict[str, str]:
    """A staff token and one for the first customer, to try the API with."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from quartermaster.auth import Role, mint_token

    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(text("SELECT id, name FROM customers ORDER BY id LIMIT 1"))
            ).first()
    finally:
        await engine.dispose()
    secret = settings.access.token_secret(settings.production)
    tokens = {
        "STAFF (every read, order, quotation and stock mutation)": mint_token(
            secret, Role.STAFF, ttl_s=12 * 3600, subject="staff:dev"
        )
    }
    if row is not None:
        tokens[f"CUSTOMER {row.id} ({row.name}: their own orders and quotations)"] = mint_token(
            secret, Role.CUSTOMER, customer_id=int(row.id), ttl_s=12 * 3600
        )
    return tokens


async def _has_products(url: str) -> bool:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return bool(
                (await conn.execute(text("SELECT EXISTS (SELECT 1 FROM products)"))).scalar()
            )
    finally:
        await engine.dispose()


def _quiet_server(config: Any, announce: Callable[[], None]) -> Any:
    """A uvicorn server whose signals are handled by `dev` itself (see `request_exit`),
    and which announces itself only once its socket is listening."""
    import uvicorn

    class QuietServer(uvicorn.Server):
        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                announce()

        def request_exit(self, signum: int, frame: object) -> None:
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True

    return QuietServer(config)


def _announce(
    host: str, port: int, sandbox_url: str | None = None, tokens: dict[str, str] | None = None
) -> None:
    click.secho(f"\n  Quartermaster is running: http://{host}:{port}/graphql\n", bold=True)
    if tokens:
        click.echo(
            "  Every query needs a bearer token. In GraphiQL open Headers and paste one of:\n"
        )
        for who, value in tokens.items():
            click.echo(f"    {who}:")
            click.echo(f'    {{"Authorization": "Bearer {value}"}}\n')
        click.echo("  (valid 12 h; more with `quartermaster token --role STAFF|ADMIN|CUSTOMER`)\n")
    click.echo("  A worker runs the integration jobs (invoice, shop sync, notification)")
    if sandbox_url:
        click.echo(f"  against the sandbox partner: {sandbox_url}/_sandbox/effects\n")
    else:
        click.echo("  against the configured partner APIs.\n")
    click.echo("  Paste this into GraphiQL to start:\n")
    click.echo("    " + FIRST_QUERY.replace("\n", "\n    ") + "\n")
    click.echo("  Ctrl-C stops the server and everything it started.\n")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--reseed", is_flag=True, help="Seed even if the database already has data.")
@click.option(
    "--replica",
    is_flag=True,
    help="Embedded primary + streaming replica (queries read from the replica).",
)
def dev(host: str, port: int, reseed: bool, replica: bool) -> None:
    """One-command demo: embedded PostgreSQL + Redis, migrations, demo data, GraphiQL."""
    import uvicorn

    from quartermaster.db.migrate import upgrade
    from quartermaster.db.seed import SeedConfig
    from quartermaster.observability import configure_logging

    # Until the server takes over, SIGTERM stops like Ctrl-C: embedded services are cleaned up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    os.environ.setdefault("QM_LOG_JSON", "false")
    settings = _settings()
    configure_logging(settings.log_level, settings.log_json)
    with embedded_services(settings, replica=replica) as overrides:
        os.environ.update(overrides)
        settings = _settings()
        url = _require_database(settings)
        click.echo("migrating ...")
        upgrade(url)
        if reseed or not asyncio.run(_has_products(url)):
            click.echo("seeding the demo data set (once) ...")
            counts = _run_seed(url, SeedConfig())
            click.echo("seeded: " + ", ".join(f"{t}={n}" for t, n in counts.items()))
        sandbox_url = _sandbox_for_unconfigured_partners()
        settings = _settings()
        try:
            # The worker signs every partner request; refuse here rather than in its task.
            settings.partners.check_signing()
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        from quartermaster.app import create_app

        app = create_app(settings)
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, ws="websockets-sansio"
        )
        tokens = asyncio.run(_demo_tokens(settings, url))
        server = _quiet_server(config, lambda: _announce(host, port, sandbox_url, tokens))
        # Our handler is in place before the server exists, so a Ctrl-C at any moment from
        # here on asks for a clean stop instead of landing as KeyboardInterrupt in random code.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, server.request_exit)
        asyncio.run(_dev_main(server, settings, sandbox_url))
        # A second Ctrl-C must not cut the clean shutdown of PostgreSQL and Redis short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        click.echo("stopping embedded services ...")
    click.echo("stopped.")


_PARTNER_URL_VARS = ("QM_INVOICING_URL", "QM_SHOP_URL", "QM_NOTIFY_URL")


def _sandbox_for_unconfigured_partners() -> str | None:
    """Point every partner without a configured URL at the dev sandbox (port chosen here)."""
    missing = [name for name in _PARTNER_URL_VARS if not os.environ.get(name)]
    if not missing:
        return None
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sandbox_port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{sandbox_port}"
    for name in missing:
        os.environ[name] = url
    return url


async def _dev_main(server: Any, settings: Settings, sandbox_url: str | None) -> None:
    """The API, a worker (relay + jobs) and, when needed, the sandbox partner in one loop;
    when the API stops (Ctrl-C), the others stop too."""
    from quartermaster.integrations.sandbox import sandbox_server, secrets_from_settings
    from quartermaster.workers.runner import run_worker

    stop = asyncio.Event()
    background: list[asyncio.Task[None]] = []
    sandbox = None
    if sandbox_url is not None:
        # It checks the signatures the worker makes: the same secrets, from the same settings.
        sandbox = sandbox_server(
            "127.0.0.1",
            int(sandbox_url.rsplit(":", 1)[1]),
            secrets=secrets_from_settings(settings.partners),
        )
        # dev handles the signals; uvicorn must not take them over in the same process.
        setattr(sandbox, "capture_signals", contextlib.nullcontext)  # noqa: B010
        background.append(asyncio.create_task(sandbox.serve()))
    background.append(asyncio.create_task(run_worker(settings, stop, concurrency=8)))
    try:
        await server.serve()
    finally:
        stop.set()
        if sandbox is not None:
            sandbox.should_exit = True
        await asyncio.gather(*background, return_exceptions=True)


def _ignore_sigpipe() -> None:
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)


if __name__ == "__main__":  # pragma: no cover
    _ignore_sigpipe()
    main()

"""The Starlette application: engines, Redis and metrics live in typed app state."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import structlog
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route, WebSocketRoute
from strawberry.subscriptions import GRAPHQL_SSE_PROTOCOL, GRAPHQL_TRANSPORT_WS_PROTOCOL

from quartermaster.api import build_schema
from quartermaster.config import Settings
from quartermaster.db.engine import WRITER_SERVER_SETTINGS, Database
from quartermaster.gc_policy import GcPolicy
from quartermaster.http import GraphQLView, RequestContextMiddleware, health, metrics, ready
from quartermaster.live.hub import StockHub
from quartermaster.observability import Metrics, configure_logging
from quartermaster.ratelimit import RateLimiter
from quartermaster.workers.monitor import JobTally

log = structlog.get_logger("quartermaster.app")


class AppState:
    """What the lifespan puts on ``app.state`` (typed for readers of the code)."""

    settings: Settings
    db: Database
    redis: Redis | None
    metrics: Metrics
    live: StockHub | None


def create_app(settings: Settings | None = None, *, configure_logs: bool = True) -> Starlette:
    settings = settings or Settings.from_env()
    if configure_logs:
        configure_logging(settings.log_level, settings.log_json)
    # Refuse to start in production with a missing, short or development token secret.
    settings.access.token_secret(settings.production)
    app_metrics = Metrics()
    gc_policy = GcPolicy(settings.gc, app_metrics.registry)
    schema = build_schema(settings.graphql)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        db = Database.connect(settings.database, writer_settings=WRITER_SERVER_SETTINGS)
        app_metrics.bind_database(db)
        # Replica lag and reachability, probed in the background (decides where reads go).
        await db.monitor.start()
        redis = Redis.from_url(settings.redis.url) if settings.redis.url else None
        app.state.settings = settings
        app.state.db = db
        app.state.redis = redis
        app.state.metrics = app_metrics
        app.state.job_tally = JobTally()  # jobs by status for /metrics, counted incrementally
        # Per-caller rate limits live in Redis, shared by every instance (ratelimit.py).
        app.state.rate_limiter = RateLimiter(redis, settings.access) if redis is not None else None
        # One reader of the stock-event stream per process, shared by every subscription.
        live = StockHub(redis, db, settings, app_metrics.registry) if redis is not None else None
        app.state.live = live
        if live is not None:
            await live.start()
        # Short full garbage collections with many long-lived connections (gc_policy.py).
        gc_policy.start()
        log.info("app.started", replica=db.has_replica, redis=redis is not None, env=settings.env)
        try:
            yield
        finally:
            await gc_policy.stop()
            if live is not None:
                await live.stop()
            if redis is not None:
                await redis.aclose()
            await db.dispose()
            log.info("app.stopped")

    app = Starlette(lifespan=lifespan)
    view = GraphQLView(
        schema,
        app_state=app.state,
        graphql_ide="graphiql" if settings.graphql.graphiql else None,
        allow_queries_via_get=True,
        # graphql-transport-ws (WebSocket) and graphql-sse (POST, Accept: text/event-stream).
        subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL, GRAPHQL_SSE_PROTOCOL),
        connection_init_wait_timeout=timedelta(seconds=settings.live.connection_init_timeout_s),
        max_subscriptions_per_connection=settings.live.max_subscriptions_per_connection,
    )
    app.router.routes.extend(
        [
            Route("/graphql", view, methods=["GET", "POST"]),
            WebSocketRoute("/graphql", view),
            Route("/health", health),
            Route("/health/ready", ready),
            Route("/metrics", metrics),
        ]
    )
    if settings.access.cors_origins:
        # Browsers on other origins only where the settings list them; none by default.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.access.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-request-id", "x-consistency-token"],
            expose_headers=["x-request-id", "x-consistency-token", "retry-after"],
            max_age=600,
        )
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.graphql.max_body_bytes,
        metrics=app_metrics,
    )
    return app

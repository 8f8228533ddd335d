"""The Starlette application: engines, Redis and metrics live in typed app state."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import structlog
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.routing import Route, WebSocketRoute
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL

from quartermaster.api import build_schema
from quartermaster.config import Settings
from quartermaster.db.engine import Database
from quartermaster.http import GraphQLView, RequestContextMiddleware, health, metrics, ready
from quartermaster.observability import Metrics, configure_logging

log = structlog.get_logger("quartermaster.app")


class AppState:
    """What the lifespan puts on ``app.state`` (typed for readers of the code)."""

    settings: Settings
    db: Database
    redis: Redis | None
    metrics: Metrics


def create_app(settings: Settings | None = None, *, configure_logs: bool = True) -> Starlette:
    settings = settings or Settings.from_env()
    if configure_logs:
        configure_logging(settings.log_level, settings.log_json)
    app_metrics = Metrics()
    schema = build_schema(settings.graphql)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        db = Database.connect(settings.database)
        app_metrics.bind_database(db)
        redis = Redis.from_url(settings.redis.url) if settings.redis.url else None
        app.state.settings = settings
        app.state.db = db
        app.state.redis = redis
        app.state.metrics = app_metrics
        log.info("app.started", replica=db.has_replica, redis=redis is not None, env=settings.env)
        try:
            yield
        finally:
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
        subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,),
        connection_init_wait_timeout=timedelta(seconds=10),
        max_subscriptions_per_connection=20,
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
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.graphql.max_body_bytes,
        metrics=app_metrics,
    )
    return app

"""HTTP edge: the GraphQL view, request ids, body limits, health and metrics endpoints."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any

import orjson
import structlog
from cross_web import HTTPException  # what strawberry raises for malformed requests
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis
from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.http import GraphQLHTTPResponse
from strawberry.types import ExecutionResult

from quartermaster.context import Context
from quartermaster.db.engine import StatementStats, current_stats
from quartermaster.schema.extensions import normalize_error
from quartermaster.workers.monitor import snapshot

log = structlog.get_logger("quartermaster.http")

GRAPHQL_RESPONSE_JSON = "application/graphql-response+json"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def error_body(message: str, code: str, request_id: str | None = None) -> bytes:
    extensions: dict[str, Any] = {"code": code}
    if request_id:
        extensions["requestId"] = request_id
    return orjson.dumps({"errors": [{"message": message, "extensions": extensions}]})


def _wants_graphql_response_json(accept: str) -> bool:
    """True when the client prefers application/graphql-response+json over application/json."""
    best: tuple[float, str] | None = None
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if media not in (GRAPHQL_RESPONSE_JSON, "application/json"):
            continue
        q = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        # Prefer graphql-response+json on a tie: it is the newer, more precise media type.
        if best is None or q > best[0] or (q == best[0] and media == GRAPHQL_RESPONSE_JSON):
            best = (q, media)
    return best is not None and best[1] == GRAPHQL_RESPONSE_JSON and best[0] > 0


class GraphQLView(GraphQL[Context, None]):
    """strawberry's ASGI view with our context, JSON via orjson and errors that carry codes."""

    def __init__(self, *args: Any, app_state: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.app_state = app_state

    async def get_context(self, request: Request | WebSocket, response: Any) -> Context:
        state = self.app_state
        return Context(
            settings=state.settings,
            db=state.db,
            request_id=request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex,
            request=request,
            response=response,
            metrics=state.metrics,
            redis=state.redis,
        )

    def parse_json(self, data: str | bytes) -> Any:
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError as exc:  # also invalid UTF-8
            raise HTTPException(400, "Unable to parse request body as JSON") from exc
        if not isinstance(value, (dict, list)):
            raise HTTPException(400, "The request body must be a JSON object.")
        return value

    def encode_json(self, data: object) -> bytes:
        return orjson.dumps(data)

    async def process_result(
        self, request: Request, result: ExecutionResult
    ) -> GraphQLHTTPResponse:
        rid = request.scope.get("state", {}).get("request_id")
        request_error = False
        if result.errors:
            result.errors = [normalize_error(e, rid) for e in result.errors]
            # A request error (parse, validation, coercion): nothing was executed.
            request_error = result.data is None and all(e.path is None for e in result.errors)
            if request_error:
                request.scope.setdefault("state", {})["qm_request_error"] = True
        processed = await super().process_result(request, result)
        if request_error:
            processed.pop("data", None)  # GraphQL-over-HTTP: no `data` entry on request errors
        return processed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        request = Request(scope, receive=receive)
        rid = scope.get("state", {}).get("request_id")
        wants_gql_json = _wants_graphql_response_json(request.headers.get("accept", ""))
        try:
            response = await self.run(request)
        except HTTPException as exc:
            code = "METHOD_NOT_ALLOWED" if exc.status_code == 405 else "BAD_REQUEST"
            if exc.status_code == 404:
                code = "NOT_FOUND"
            response = Response(
                error_body(exc.reason, code, rid),
                status_code=exc.status_code,
                media_type=GRAPHQL_RESPONSE_JSON if wants_gql_json else "application/json",
            )
            if exc.status_code == 405:
                response.headers["Allow"] = "GET, POST"
        else:
            if wants_gql_json and response.media_type == "application/json":
                response.headers["content-type"] = GRAPHQL_RESPONSE_JSON
                if scope.get("state", {}).get("qm_request_error") and response.status_code == 200:
                    response.status_code = 400
        await response(scope, receive, send)


class RequestContextMiddleware:
    """Request id (header in and out), body size limit, statement count and access log."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: Any = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        incoming = headers.get("x-request-id", "")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        stats = StatementStats()
        token = current_stats.set(stats)
        started = time.perf_counter()
        status = {"code": 0}

        if scope["type"] == "websocket":
            try:
                await self.app(scope, receive, send)
            finally:
                current_stats.reset(token)
            return

        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(scope, receive, send, request_id)
            current_stats.reset(token)
            return

        received = 0
        limit = self.max_body_bytes

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_id)
        except _BodyTooLarge:
            await self._too_large(scope, receive, send, request_id)
            status["code"] = 413
        finally:
            current_stats.reset(token)
            path = scope.get("path", "")
            if self.metrics is not None:
                label = (
                    path
                    if path in ("/graphql", "/health", "/health/ready", "/metrics")
                    else "other"
                )
                self.metrics.http.labels(label, str(status["code"])).inc()
            if path not in ("/health", "/metrics"):
                log.info(
                    "http.request",
                    method=scope.get("method"),
                    path=path,
                    status=status["code"],
                    ms=round((time.perf_counter() - started) * 1000, 2),
                    sql=stats.total,
                )

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, rid: str) -> None:
        response = Response(
            error_body(
                f"Request body is larger than {self.max_body_bytes} bytes.",
                "REQUEST_TOO_LARGE",
                rid,
            ),
            status_code=413,
            media_type="application/json",
            headers={"x-request-id": rid},
        )
        await response(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    state = request.app.state
    checks: dict[str, str] = {}
    parts: list[tuple[str, Any]] = [("primary", state.db.primary)]
    if state.db.has_replica:
        parts.append(("replica", state.db.replica))
    for name, engine in parts:
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"error: {type(exc).__name__}"
    redis: Redis | None = state.redis
    if redis is None:
        checks["redis"] = "error: not configured"
    else:
        try:
            await redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"error: {type(exc).__name__}"
    failing = [name for name, value in checks.items() if value != "ok"]
    body: dict[str, Any] = {"status": "ok" if not failing else "unavailable", "checks": checks}
    if failing:
        body["failing"] = failing
    return JSONResponse(body, status_code=200 if not failing else 503)


PIPELINE_REFRESH_S = 5.0


async def metrics(request: Request) -> Response:
    state = request.app.state
    pipeline = state.metrics.pipeline
    now = time.monotonic()
    if now - pipeline.taken_at >= PIPELINE_REFRESH_S:
        pipeline.taken_at = now
        try:
            pipeline.update(await asyncio.wait_for(snapshot(state.db, state.redis), 2.0))
        except Exception as exc:  # a slow or broken dependency must not break /metrics
            log.warning("metrics.pipeline_error", error=repr(exc))
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

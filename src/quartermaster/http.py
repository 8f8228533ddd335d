"""HTTP edge: the GraphQL view, request ids, body limits, health and metrics endpoints."""

from __future__ import annotations

import asyncio
import math
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
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError
from strawberry.http import GraphQLHTTPResponse
from strawberry.types import ExecutionResult, SubscriptionExecutionResult
from strawberry.types.unset import UNSET, UnsetType

from quartermaster.auth import AuthenticationError, Principal, principal_from_header
from quartermaster.context import Context
from quartermaster.db.engine import StatementStats, current_stats
from quartermaster.db.replica import TOKEN_HEADER, InvalidConsistencyToken, decode_token
from quartermaster.live.connection import RAW_WEBSOCKET_SEND
from quartermaster.live.expiry import until_expiry
from quartermaster.live.transport import LiveTransportWSHandler, bearer_token
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


class CodedHTTPException(HTTPException):
    """A request the view refuses before executing it, with our own ``extensions.code``."""

    def __init__(
        self, status_code: int, reason: str, code: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status_code, reason)
        self.code = code
        self.headers = headers or {}


class GraphQLView(GraphQL[Context, None]):
    """strawberry's ASGI view with our context, JSON via orjson and errors that carry codes."""

    #: graphql-transport-ws with the hooks of live stock subscriptions (``live/transport.py``).
    graphql_transport_ws_handler_class = LiveTransportWSHandler

    def __init__(self, *args: Any, app_state: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.app_state = app_state

    async def get_context(self, request: Request | WebSocket, response: Any) -> Context:
        state = self.app_state
        context = Context(
            settings=state.settings,
            db=state.db,
            request_id=request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex,
            request=request,
            # A WebSocket has no response headers to add to (strawberry passes the socket here,
            # whose request headers are read-only: a mutation's consistency token would fail).
            response=response if isinstance(request, Request) else None,
            metrics=state.metrics,
            redis=state.redis,
            live=getattr(state, "live", None),
            # Every transport charges the same limiter: HTTP requests and each operation on a
            # WebSocket alike (the bucket is chosen once the caller is known).
            rate_limiter=getattr(state, "rate_limiter", None),
        )
        if isinstance(request, Request):
            self._authenticate(context, request)
        token = request.headers.get(TOKEN_HEADER) if isinstance(request, Request) else None
        if token:
            try:
                context.consistency_lsn = decode_token(token)
            except InvalidConsistencyToken as exc:
                raise CodedHTTPException(400, str(exc), "INVALID_CONSISTENCY_TOKEN") from exc
        return context

    def _authenticate(self, context: Context, request: Request) -> None:
        """The caller from ``Authorization: Bearer``; a bad token is a 401, never anonymous."""
        settings = context.settings
        try:
            context.principal = principal_from_header(
                settings.access.token_secret(settings.production),
                request.headers.get("authorization"),
            )
        except AuthenticationError as exc:
            raise CodedHTTPException(
                401, exc.message, exc.code, {"WWW-Authenticate": 'Bearer realm="quartermaster"'}
            ) from exc
        context.rate_key = rate_key(context.principal, request, settings)

    async def on_ws_connect(self, context: Context) -> UnsetType | None:
        """``connection_init``: the bearer token of the payload (``{"token": "…"}`` or
        ``{"Authorization": "Bearer …"}``; browsers cannot set WebSocket headers) names the
        caller of every operation on the connection. A bad token closes it with 4403."""
        context.token = bearer_token(context.connection_params or {})
        if context.token is not None:
            settings = context.settings
            try:
                context.principal = principal_from_header(
                    settings.access.token_secret(settings.production), f"Bearer {context.token}"
                )
            except AuthenticationError as exc:
                raise ConnectionRejectionError({"code": exc.code, "message": exc.message}) from exc
        request = context.request
        if isinstance(request, HTTPConnection):
            # The same bucket as the caller's HTTP requests: the token's subject, or the address.
            context.rate_key = rate_key(context.principal, request, context.settings)
        return UNSET

    async def execute_operation(
        self,
        request: Request,
        request_adapter: Any,
        request_data: Any,
        context: Context,
        root_value: Any,
        sub_response: Any,
    ) -> Any:
        result = await super().execute_operation(
            request, request_adapter, request_data, context, root_value, sub_response
        )
        expires_at = context.principal.expires_at
        if expires_at is not None and isinstance(result, SubscriptionExecutionResult):
            # A stream over HTTP (graphql-sse) ends when its token does, like a WebSocket.
            return until_expiry(result, expires_at)
        return result

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
            _refuse_simple_posts(request)
            response = await self.run(request)
        except HTTPException as exc:
            code = "METHOD_NOT_ALLOWED" if exc.status_code == 405 else "BAD_REQUEST"
            if exc.status_code == 404:
                code = "NOT_FOUND"
            code = getattr(exc, "code", code)
            response = Response(
                error_body(exc.reason, code, rid),
                status_code=exc.status_code,
                media_type=GRAPHQL_RESPONSE_JSON if wants_gql_json else "application/json",
            )
            if exc.status_code == 405:
                response.headers["Allow"] = "GET, POST"
            for name, value in getattr(exc, "headers", {}).items():
                response.headers[name] = value
        else:
            if wants_gql_json and response.media_type == "application/json":
                response.headers["content-type"] = GRAPHQL_RESPONSE_JSON
                if scope.get("state", {}).get("qm_request_error") and response.status_code == 200:
                    response.status_code = 400
            retry_after = scope.get("state", {}).get("qm_retry_after")
            if retry_after is not None:  # the rate limiter refused (schema/access.py)
                response.status_code = 429
                response.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        await response(scope, receive, send)


#: POST bodies a browser may send cross-site without a CORS preflight (CSRF): refused.
_SIMPLE_POST_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data", "text/plain")


def _refuse_simple_posts(request: Request) -> None:
    if request.method != "POST":
        return
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media in _SIMPLE_POST_TYPES:
        raise CodedHTTPException(
            415,
            f"{media} bodies are not accepted (they could be sent cross-site); "
            "send application/json.",
            "UNSUPPORTED_MEDIA_TYPE",
        )


def rate_key(principal: Principal, connection: HTTPConnection, settings: Any) -> str:
    """The caller's rate-limit bucket: the token's subject, else the client address."""
    return principal.rate_key or f"ip:{client_address(connection, settings)}"


def client_address(request: HTTPConnection, settings: Any) -> str:
    """The caller's address: the first ``X-Forwarded-For`` hop when a trusted proxy sets it."""
    if settings.access.trust_forwarded_for:
        forwarded = request.headers.get("x-forwarded-for", "")
        first = forwarded.split(",")[0].strip()
        if first:
            return first
    return request.client.host if request.client else "unknown"


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
            # The server's own send, below Starlette's wrappers: live stock frames go straight
            # to it (``live/transport.py``), one call per frame and subscriber.
            scope[RAW_WEBSOCKET_SEND] = send
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
    # A broken or lagging replica does not make the API unready: reads go to the primary.
    failing = [name for name, value in checks.items() if value != "ok" and name != "replica"]
    degraded = checks.get("replica", "ok") != "ok" or state.db.read_target("replica") != "replica"
    status = "unavailable" if failing else "degraded" if state.db.has_replica and degraded else "ok"
    body: dict[str, Any] = {"status": status, "checks": checks, "reads": state.db.health.describe()}
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
            pipeline.update(
                await asyncio.wait_for(snapshot(state.db, state.redis, state.job_tally), 2.0)
            )
        except Exception as exc:  # a slow or broken dependency must not break /metrics
            log.warning("metrics.pipeline_error", error=repr(exc))
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

"""Schema extensions: database routing, error codes and masking, per-operation metrics."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import structlog
from graphql import GraphQLError, GraphQLSyntaxError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from strawberry.extensions import SchemaExtension
from strawberry.types.graphql import OperationType

from quartermaster.db.replica import (
    TOKEN_HEADER,
    current_wal_lsn,
    encode_token,
    replica_failure,
)
from quartermaster.errors import ApiError

log = structlog.get_logger("quartermaster.graphql")


def normalize_error(error: GraphQLError, request_id: str | None) -> GraphQLError:
    """Give every error an ``extensions.code``; mask unexpected resolver exceptions."""
    original = error.original_error
    extensions = dict(error.extensions or {})
    if isinstance(original, ApiError):
        extensions = {**original.extensions, **extensions}
        error.extensions = extensions
        return error
    if "code" in extensions:
        return error
    if isinstance(error, GraphQLSyntaxError):
        extensions["code"] = "GRAPHQL_PARSE_FAILED"
    elif error.path is None:
        # Validation and variable coercion: the request itself is wrong.
        extensions["code"] = (
            "BAD_USER_INPUT" if original is not None else "GRAPHQL_VALIDATION_FAILED"
        )
    elif original is None or isinstance(original, GraphQLError):
        extensions["code"] = "BAD_USER_INPUT"
    elif _is_database_unavailable(original):
        # Overload (no pooled connection came free in time) or an unreachable database: the
        # request did not take effect unless it committed before the failure, which a retry
        # with the same idempotency key (placeOrder) settles. Not a bug: no traceback.
        log.warning(
            "graphql.database_unavailable",
            path=".".join(str(p) for p in error.path),
            error=repr(original),
        )
        return GraphQLError(
            "The database is busy or unreachable; try again shortly.",
            nodes=error.nodes,
            path=error.path,
            extensions={"code": "SERVICE_UNAVAILABLE", "requestId": request_id},
        )
    elif _is_data_exception(original):
        return GraphQLError(
            "An argument holds a value the database cannot take (e.g. a NUL character).",
            nodes=error.nodes,
            path=error.path,
            extensions={"code": "BAD_USER_INPUT"},
        )
    else:
        log.error(
            "graphql.unexpected_error",
            path=".".join(str(p) for p in error.path),
            exc_info=original,
        )
        return GraphQLError(
            "Internal server error",
            nodes=error.nodes,
            path=error.path,
            extensions={"code": "INTERNAL_SERVER_ERROR", "requestId": request_id},
        )
    error.extensions = extensions
    return error


def _is_database_unavailable(exc: BaseException) -> bool:
    """No connection from the pool in time, or none to the server at all."""
    if isinstance(exc, PoolTimeout):
        return True
    return replica_failure(exc) == "connection"


def _is_data_exception(exc: BaseException) -> bool:
    """PostgreSQL SQLSTATE class 22 (data exception): the client sent a value it cannot store."""
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate.startswith("22")


def _request_id(context: Any) -> str | None:
    return getattr(context, "request_id", None)


class ErrorCodes(SchemaExtension):
    def _fix(self, result: Any) -> None:
        errors = getattr(result, "errors", None)
        if errors:
            rid = _request_id(self.execution_context.context)
            result.errors = [normalize_error(e, rid) for e in errors]

    def on_operation(self) -> Iterator[None]:
        yield
        self._fix(self.execution_context.result)


class DatabaseRouting(SchemaExtension):
    """Where an operation reads, and read-your-writes across requests (``db/replica.py``).

    Mutations (and every field of their payloads) read from the primary, and their response
    carries a consistency token: the primary's WAL position after their commits, in the
    ``X-Consistency-Token`` header and ``extensions.consistencyToken``. A query that sends the
    token back reads from the replica only when the replica has replayed that far, else from
    the primary. Without a token, queries read from the replica (while it is healthy).
    """

    #: Set per instance after a mutation (strawberry builds the extensions per operation).
    token: str | None = None

    async def on_execute(self) -> AsyncIterator[None]:
        context = self.execution_context.context
        db = getattr(context, "db", None)
        operation = self.execution_context.operation_type
        if operation is OperationType.MUTATION and hasattr(context, "use_primary"):
            context.use_primary()
            yield
            if db is not None:
                lsn = getattr(context, "commit_lsn", None)
                self.token = encode_token(lsn) if lsn is not None else await _commit_token(db)
                response = getattr(context, "response", None)
                if self.token and response is not None and hasattr(response, "headers"):
                    response.headers[TOKEN_HEADER] = self.token
            return
        lsn = getattr(context, "consistency_lsn", None)
        if (
            lsn is not None
            and db is not None
            and context.role == "replica"
            and (db.read_target("replica") != "replica" or not await db.monitor.replayed(lsn))
        ):
            context.use_primary()
        yield

    def get_results(self) -> dict[str, Any]:
        return {"consistencyToken": self.token} if self.token else {}


async def _commit_token(db: Any) -> str | None:
    try:
        return encode_token(await current_wal_lsn(db))
    except Exception as exc:  # the writes are committed; only the token is missing
        log.warning("consistency_token.unavailable", error=repr(exc))
        return None


class OperationMetrics(SchemaExtension):
    def on_operation(self) -> Iterator[None]:
        started = time.perf_counter()
        yield
        context = self.execution_context.context
        metrics = getattr(context, "metrics", None)
        if metrics is None:
            return
        try:
            op_type = self.execution_context.operation_type.value
        except RuntimeError:
            op_type = "unknown"
        except Exception:
            op_type = "unknown"
        result = self.execution_context.result
        outcome = "error" if getattr(result, "errors", None) else "ok"
        metrics.observe_operation(
            self.execution_context.operation_name, op_type, outcome, time.perf_counter() - started
        )

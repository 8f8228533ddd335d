"""Streams over HTTP (graphql-sse) end when the caller's token expires.

A WebSocket checks its token once, at ``connection_init``, and closes with 4401 when it expires
(``live/transport.py``). An SSE stream has no close code, so its last event is an ordinary
``next`` carrying a ``TOKEN_EXPIRED`` error, followed by ``complete``: the client signs in again
and resumes with ``after``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterable
from typing import Any

from graphql import GraphQLError
from strawberry.types import ExecutionResult

TOKEN_EXPIRED_MESSAGE = "The token has expired; sign in again and resume with `after`."


def token_expired_result() -> ExecutionResult:
    return ExecutionResult(
        data=None,
        errors=[GraphQLError(TOKEN_EXPIRED_MESSAGE, extensions={"code": "TOKEN_EXPIRED"})],
    )


async def until_expiry(source: AsyncIterable[Any], expires_at: float) -> AsyncGenerator[Any, None]:
    """``source``'s results until ``expires_at`` (a UNIX time), then a ``TOKEN_EXPIRED`` result
    and the end; ``source`` is closed either way (its subscription leaves the hub)."""
    iterator = aiter(source)
    try:
        while True:
            remaining = expires_at - time.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    item = await anext(iterator)
            except StopAsyncIteration:
                return
            except TimeoutError:
                break
            yield item
        yield token_expired_result()
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()

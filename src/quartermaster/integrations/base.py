"""The HTTP plumbing every partner client shares: one pooled httpx transport, auth, signing, errors.

A typed client (``invoicing/client.py`` …) only says which method and path to call and how to
read the answer; everything a worker relies on — explicit timeouts, the ``Idempotency-Key``
header, the body signature, turning failures into :class:`RetryableError` or
:class:`PermanentError`, the latency callback — happens here, the same way for every partner.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
import orjson
import structlog

from quartermaster.integrations.errors import (
    PartnerError,
    PermanentError,
    RetryableError,
    error_for_exception,
    error_for_response,
)
from quartermaster.integrations.signing import SIGNATURE_HEADER, sign
from quartermaster.integrations.transport import AiohttpTransport

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: ``on_call(partner, seconds, outcome)``; outcome is ``ok``, ``retryable`` or ``permanent``.
OnCall = Callable[[str, float, str], None]

IDEMPOTENCY_HEADER = "Idempotency-Key"
#: Keys are stored in ``integration_jobs.idempotency_key`` (200 chars) and sent as a header.
MAX_IDEMPOTENCY_KEY_CHARS = 200


def _check_idempotency_key(key: str) -> None:
    # A programming error, not a partner failure: raised before anything is sent.
    if not key or len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise ValueError(f"idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters")
    if not key.isascii() or not key.isprintable():
        raise ValueError("idempotency key must be printable ASCII (it is sent as a header)")


class PartnerClient:
    """One partner's API over a single pooled httpx transport (aiohttp underneath).

    Create one per partner per process and share it: the connection pool is the point. Use it
    as ``async with`` or call :meth:`aclose` on shutdown.
    """

    #: Name used in errors, logs and metrics; set by each subclass.
    partner: str = "partner"

    def __init__(
        self,
        base_url: str,
        *,
        signing_secret: str,
        api_key: str | None = None,
        timeout: float = 5.0,
        connect_timeout: float = 2.0,
        max_connections: int = 32,
        on_call: OnCall | None = None,
    ) -> None:
        # Every request is signed; settings supply the development secret outside production.
        if not signing_secret:
            raise ValueError(f"{self.partner}: a signing secret is required")
        headers = {"Accept": "application/json", "User-Agent": "quartermaster"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.base_url = base_url
        self._signing_secret = signing_secret
        self._on_call = on_call
        self._urls: dict[str, httpx.URL] = {}
        limits = httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=30.0,
        )
        # aiohttp underneath (integrations/transport.py).
        self._transport = AiohttpTransport(limits=limits)
        self._headers = headers
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout).as_dict()
        # Paths are appended to the base URL's path, as httpx.AsyncClient(base_url=...) does.
        self._base = httpx.URL(base_url if base_url.endswith("/") else base_url + "/")

    def _url(self, path: str) -> httpx.URL:
        """``path`` joined to the base URL, parsed once per path."""
        url = self._urls.get(path)
        if url is None:
            if len(self._urls) >= 256:  # paths with ids in them must not grow it forever
                self._urls.clear()
            raw = self._base.raw_path + path.lstrip("/").encode()
            url = self._urls[path] = self._base.copy_with(raw_path=raw)
        return url

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        payload: Mapping[str, Any],
        *,
        idempotency_key: str,
        parse: Callable[[dict[str, Any]], T],
    ) -> T:
        """Send ``payload`` as JSON and return ``parse(answer)``; raise a PartnerError.

        ``parse`` may raise KeyError, TypeError or ValueError on a malformed answer; that is a
        PermanentError because the partner broke the contract and a repeat will not fix it.
        """
        _check_idempotency_key(idempotency_key)
        body = orjson.dumps(payload)
        headers = {"Content-Type": "application/json", IDEMPOTENCY_HEADER: idempotency_key}
        headers[SIGNATURE_HEADER] = sign(self._signing_secret, body, int(time.time()))
        started = time.perf_counter()
        status: int | None = None
        try:
            try:
                # httpx's transport API, without httpx.AsyncClient's per-request work that a
                # partner call has no use for (merging defaults, cookie jar, auth flow, redirect
                # loop): that was a third of a call's client CPU. A redirect is not followed: it
                # means a wrong URL, and following it could resend the body somewhere else.
                request = httpx.Request(
                    method,
                    self._url(path),
                    content=body,
                    headers={**self._headers, **headers},
                    extensions={"timeout": self._timeout},
                )
                response = await self._transport.handle_async_request(request)
                await response.aread()
            except httpx.RequestError as exc:
                raise error_for_exception(self.partner, exc) from exc
            status = response.status_code
            error = error_for_response(self.partner, response)
            if error is not None:
                raise error
            try:
                answer = orjson.loads(response.content)
                if not isinstance(answer, dict):
                    raise TypeError("not a JSON object")
                result = parse(answer)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise PermanentError(
                    self.partner,
                    f"{self.partner}: {status} with an unexpected body ({exc!r})",
                    status,
                ) from exc
        except PartnerError as exc:
            outcome = "retryable" if isinstance(exc, RetryableError) else "permanent"
            self._finish(method, path, idempotency_key, started, status, outcome, exc.message)
            raise
        self._finish(method, path, idempotency_key, started, status, "ok", None)
        return result

    def _finish(
        self,
        method: str,
        path: str,
        idempotency_key: str,
        started: float,
        status: int | None,
        outcome: str,
        error: str | None,
    ) -> None:
        seconds = time.perf_counter() - started
        fields = {
            "partner": self.partner,
            "method": method,
            "path": path,
            "status": status,
            "outcome": outcome,
            "duration_ms": round(seconds * 1000, 1),
            "idempotency_key": idempotency_key,
        }
        if error is None:
            log.info("partner.call", **fields)
        else:
            log.warning("partner.call", error=error, **fields)
        if self._on_call is not None:
            try:
                self._on_call(self.partner, seconds, outcome)
            except Exception:
                # Metrics must never turn a delivered invoice into a failed (re-sent) job.
                log.exception("partner.on_call_failed", partner=self.partner)


def require(data: Mapping[str, Any], key: str, kind: type[T]) -> T:
    """``data[key]`` if it is a ``kind`` (bools are not ints); TypeError/KeyError otherwise."""
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{key!r} should be {kind.__name__}, got {type(value).__name__}")
    return value

"""What can go wrong when calling a partner, sorted by what a worker should do about it.

Workers decide between "try again later" and "give up" from the exception type alone, so the
classification lives here, in one place: timeouts, dropped connections, 408, 429 and 5xx are
:class:`RetryableError` (the partner may well succeed later, and the idempotency key makes a
repeat safe); every other refusal is a :class:`PermanentError` (repeating the same request will
get the same answer, so it should go to the dead-letter stream and to a person).
"""

from __future__ import annotations

import math
import time
from email.utils import parsedate_to_datetime
from http import HTTPStatus

import httpx
import orjson

#: Statuses outside 5xx that still mean "later": request timeout and rate limit.
RETRYABLE_STATUSES = frozenset({408, 429})
#: Partner messages are cut to this length so a proxy's HTML error page cannot flood the logs.
MAX_DETAIL_CHARS = 200


class PartnerError(Exception):
    """A partner call failed; ``status`` is the HTTP status, or None when no response came."""

    def __init__(self, partner: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.partner = partner
        self.message = message
        self.status = status


class RetryableError(PartnerError):
    """Worth another attempt; ``retry_after`` is the partner's requested pause in seconds."""

    def __init__(
        self,
        partner: str,
        message: str,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(partner, message, status)
        self.retry_after = retry_after


class PermanentError(PartnerError):
    """The partner refused the request itself (or answered nonsense); repeating will not help."""


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from ``now``: delay-seconds or an HTTP date (RFC 9110 §10.2.3).

    Fractional seconds are accepted although the RFC only allows integers, because the sandbox
    (and some real gateways) send them. Anything unparseable is None: a malformed hint must not
    turn a retryable failure into a crash.
    """
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" dates parse as naive; HTTP dates are always GMT
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def _detail(response: httpx.Response) -> str | None:
    """The partner's own explanation, if the body carries a short one."""
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        text = response.text.strip()
        # An HTML error page says nothing the status line does not already say.
        return text[:MAX_DETAIL_CHARS] if text and not text.startswith("<") else None
    if isinstance(body, dict):
        for key in ("message", "detail", "error"):
            if isinstance(body.get(key), str) and body[key]:
                return str(body[key])[:MAX_DETAIL_CHARS]
    return None


def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def error_for_response(partner: str, response: httpx.Response) -> PartnerError | None:
    """None for a 2xx response, otherwise the error a worker should see for it."""
    status = response.status_code
    if 200 <= status < 300:
        return None
    message = f"{partner}: {_status_line(status)}"
    detail = _detail(response)
    if detail:
        message = f"{message}: {detail}"
    if status in RETRYABLE_STATUSES or status >= 500:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return RetryableError(partner, message, status, retry_after)
    # Other 4xx, and 1xx/3xx (a redirect means a misconfigured URL, not a busy partner).
    return PermanentError(partner, message, status)


def error_for_exception(partner: str, exc: httpx.RequestError) -> RetryableError:
    """No usable response at all: the request may or may not have reached the partner.

    Always retryable, because the idempotency key makes sending it again harmless.
    """
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "connection failed"
    return RetryableError(partner, f"{partner}: {kind} ({type(exc).__name__})", None)

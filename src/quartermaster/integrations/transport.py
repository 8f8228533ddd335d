"""An httpx transport that sends requests with aiohttp: httpx's API, a cheaper engine.

Why: a worker makes a few partner calls per order, and on these machines a call through
``httpx.AsyncClient`` and httpx's default transport (httpcore, h11 and anyio) cost 1.5–1.8 ms of
client CPU on loopback (16 calls in flight, against the sandbox), where aiohttp's C-accelerated
HTTP/1.1 client alone costs about 0.15 ms. Through this transport a call costs 0.27–0.34 ms
with the client, about 0.21 ms through the transport API as ``PartnerClient`` sends it.
Requests, responses, timeouts and errors stay httpx's; only the bytes go through an
``aiohttp.ClientSession``.

The package ``httpx-aiohttp`` does the same, but maps some failures to the wrong httpx class
(a refused connection becomes ``ConnectTimeout``) and lets others escape as aiohttp exceptions;
the workers decide "retry" or "give up" from the exception type, so the mapping here is explicit.

Scope, on purpose: HTTP/1.1, no proxies, whole bodies (a partner's answer is a small JSON
document, capped at :data:`MAX_RESPONSE_BYTES`), no redirects (the client refuses them anyway).
"""

from __future__ import annotations

import ssl

import aiohttp
import httpx

#: A partner answer larger than this is a broken partner, not data: the call fails (retryable).
MAX_RESPONSE_BYTES = 4 * 1024 * 1024


def _mapped(exc: Exception, request: httpx.Request) -> httpx.TransportError:
    """The httpx exception a caller of ``httpx.AsyncClient`` would have seen for ``exc``."""
    message = str(exc) or type(exc).__name__
    error: httpx.TransportError
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        # Also aiohttp's ``connect`` bound, which includes the wait for a pooled connection.
        error = httpx.ConnectTimeout(message)
    elif isinstance(exc, TimeoutError):  # SocketTimeoutError and any other timeout
        error = httpx.ReadTimeout(message)
    elif isinstance(exc, aiohttp.ClientConnectorError):
        error = httpx.ConnectError(message)
    elif isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        error = httpx.RemoteProtocolError(message)
    elif isinstance(exc, aiohttp.ClientResponseError):
        # aiohttp raises this for a response it cannot parse.
        error = httpx.RemoteProtocolError(message)
    elif isinstance(exc, aiohttp.InvalidURL):
        error = httpx.UnsupportedProtocol(message)
    else:  # ClientOSError, ClientConnectionResetError and any other aiohttp.ClientError
        error = httpx.ReadError(message)
    error.request = request
    return error


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Send an ``httpx.AsyncClient``'s requests over one pooled ``aiohttp.ClientSession``.

    ``limits`` are honoured as httpx would: at most ``max_connections`` connections, idle ones
    closed after ``keepalive_expiry`` seconds. The per-request timeouts httpx puts in
    ``request.extensions["timeout"]`` map to aiohttp's: ``connect`` → ``sock_connect``,
    ``read`` → ``sock_read`` (the wait for each chunk of the answer), ``pool`` → ``connect``
    (a free connection plus the TCP connect).
    """

    def __init__(self, *, limits: httpx.Limits, verify: ssl.SSLContext | bool = True) -> None:
        self._limits = limits
        self._verify = verify
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Created on first use so that it belongs to the event loop that sends the requests.
        connector = aiohttp.TCPConnector(
            limit=self._limits.max_connections or 0,
            keepalive_timeout=self._limits.keepalive_expiry or 15.0,
            # httpx's context (certifi's CA bundle), so HTTPS partners verify as before.
            ssl=httpx.create_ssl_context() if self._verify is True else self._verify,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # httpx's client keeps the cookies and decodes the body (Content-Encoding) itself.
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None),
        )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        timeout = request.extensions.get("timeout", {})
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = await request.aread()
        # ``raw`` keeps the names as the caller spelled them (``multi_items`` lowercases them).
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        try:
            async with session.request(
                request.method,
                str(request.url),
                headers=headers,
                data=body or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=timeout.get("pool"),
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                ),
            ) as answer:
                content = bytearray()
                async for chunk in answer.content.iter_chunked(64 * 1024):
                    content += chunk
                    if len(content) > MAX_RESPONSE_BYTES:
                        raise httpx.RemoteProtocolError(
                            f"response body over {MAX_RESPONSE_BYTES} bytes", request=request
                        )
                status, raw_headers, reason = answer.status, answer.raw_headers, answer.reason
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _mapped(exc, request) from exc
        extensions: dict[str, object] = {"http_version": b"HTTP/1.1"}
        if reason:
            extensions["reason_phrase"] = reason.encode("ascii", "replace")
        return httpx.Response(
            status_code=status,
            headers=list(raw_headers),
            content=bytes(content),
            request=request,
            extensions=extensions,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

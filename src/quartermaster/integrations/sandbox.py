"""A fake of all three partner APIs, for ``quartermaster dev`` and for tests that need real HTTP.

It behaves like a well-run partner — it checks signatures, insists on an ``Idempotency-Key`` and
answers a repeated key with the first answer and no second side effect — and it can be told to
behave badly through ``/_sandbox/config``: latency, random 5xx or 429, the next N requests
failing, or keys that always fail (one poisoned job among healthy ones). Everything it did is
visible under ``/_sandbox/calls`` and ``/_sandbox/effects``, so a test can assert "exactly one
invoice per order" from the partner's side.

Requests are handled on one event loop; the only ``await`` points (reading the body, the
injected latency) come before the decision, so check-then-act on the idempotency store is
atomic. Note that, as with a real partner, a request whose client gave up (timeout) still takes
effect after its latency — exactly the case idempotency keys exist for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from quartermaster.config import GcSettings, PartnerSettings, PartnersSettings
from quartermaster.gc_policy import GcPolicy
from quartermaster.integrations.shop.client import MAX_ITEMS_PER_PUSH
from quartermaster.integrations.signing import SIGNATURE_HEADER, verify

log = structlog.get_logger(__name__)

PARTNERS = ("invoicing", "shop", "notifications")
#: Old calls are dropped beyond this, so a long ``dev`` session does not grow without bound.
MAX_RECORDED_CALLS = 100_000

Reply = tuple[int, dict[str, Any]]


class _Invalid(Exception):
    """The request body breaks the partner's contract: 422."""


@dataclass
class FaultConfig:
    """How one partner misbehaves; all zero means it always answers promptly and correctly."""

    latency_ms: int = 0
    error_rate: float = 0.0
    error_status: int = 503
    rate_429: float = 0.0
    retry_after_s: float = 1.0
    fail_next: int = 0
    poison_keys: list[str] = field(default_factory=list)


def _check_config(changes: Any) -> tuple[str, dict[str, Any]]:
    """Validate a ``POST /_sandbox/config`` body; ValueError names the offending field."""
    if not isinstance(changes, dict):
        raise ValueError("body must be a JSON object")
    changes = dict(changes)
    partner = changes.pop("partner", "*")
    if partner != "*" and partner not in PARTNERS:
        raise ValueError(f"partner must be one of {', '.join(PARTNERS)} or '*'")
    known = {f.name for f in dataclasses.fields(FaultConfig)}
    if unknown := sorted(set(changes) - known):
        raise ValueError(f"unknown field(s): {', '.join(unknown)}")

    def number(name: str, low: float, high: float, integer: bool = False) -> None:
        if name not in changes:
            return
        value = changes[name]
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
            kind = "an integer" if integer else "a number"
            raise ValueError(f"{name} must be {kind} from {low:g} to {high:g}")

    number("latency_ms", 0, 600_000, integer=True)
    number("error_rate", 0, 1)
    number("rate_429", 0, 1)
    number("error_status", 400, 599, integer=True)
    number("retry_after_s", 0, 86_400)
    number("fail_next", 0, 1_000_000, integer=True)
    poison = changes.get("poison_keys", [])
    if not isinstance(poison, list) or not all(isinstance(p, str) and p for p in poison):
        raise ValueError("poison_keys must be a list of non-empty strings")
    return partner, changes


def _money(value: Any, name: str) -> Decimal:
    if not isinstance(value, str):
        raise _Invalid(f"{name} must be a decimal string")
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise _Invalid(f"{name} must be a decimal string, got {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise _Invalid(f"{name} must be a non-negative amount")
    return amount


def _text(body: dict[str, Any], name: str, *, optional: bool = False) -> str | None:
    value = body.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise _Invalid(f"{name} must be a non-empty string")
    return value


def _integer(body: dict[str, Any], name: str, low: int = 0) -> int:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _Invalid(f"{name} must be an integer >= {low}")
    return value


class SandboxState:
    """Configuration, recorded calls and side effects of one sandbox app."""

    def __init__(self, secrets: dict[str, str | None], seed: int) -> None:
        self.secrets = secrets
        self.seed = seed
        # Guards every mutation and snapshot, so tests may also read the state from another
        # thread than the server's; no await ever happens while it is held.
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.random = random.Random(self.seed)
        self.config = {partner: FaultConfig() for partner in PARTNERS}
        self.calls: deque[dict[str, Any]] = deque(maxlen=MAX_RECORDED_CALLS)
        self.invoices: dict[str, dict[str, Any]] = {}
        self.notifications: dict[str, dict[str, Any]] = {}
        self.availability: dict[str, int] = {}
        self.availability_pushes = 0
        #: (partner, key) -> (request body, reply): what a repeated key gets back.
        self.replies: dict[tuple[str, str], tuple[dict[str, Any], Reply]] = {}

    def configure(self, partner: str, changes: dict[str, Any]) -> None:
        for name in PARTNERS if partner == "*" else (partner,):
            self.config[name] = dataclasses.replace(self.config[name], **changes)

    def config_json(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(config) for name, config in self.config.items()}

    def effects_json(self) -> dict[str, Any]:
        return {
            "invoices": dict(self.invoices),
            "notifications": dict(self.notifications),
            "availability": dict(self.availability),
            "counts": {
                "invoices": len(self.invoices),
                "notifications": len(self.notifications),
                "availability_pushes": self.availability_pushes,
            },
        }

    def injected_failure(self, partner: str, key: str) -> tuple[int, dict[str, str]] | None:
        """The status (and headers) of a failure the configuration asks for, if any."""
        config = self.config[partner]
        status: int | None = None
        if any(poison in key for poison in config.poison_keys):
            status = config.error_status
        elif config.fail_next > 0:
            config.fail_next -= 1
            status = config.error_status
        elif config.rate_429 > 0 or config.error_rate > 0:
            # One draw per request keeps a seeded run reproducible whatever the rates are.
            draw = self.random.random()
            if draw < config.rate_429:
                status = 429
            elif draw < config.rate_429 + config.error_rate:
                status = config.error_status
        if status is None:
            return None
        headers = {"Retry-After": f"{config.retry_after_s:g}"} if status == 429 else {}
        return status, headers


def _invoice(state: SandboxState, key: str, body: dict[str, Any]) -> Reply:
    lines = body.get("lines")
    if not isinstance(lines, list) or not lines:
        raise _Invalid("lines must be a non-empty list")
    line_sum = Decimal(0)
    for index, line in enumerate(lines):
        if not isinstance(line, dict):
            raise _Invalid(f"lines[{index}] must be an object")
        _text(line, "sku")
        _integer(line, "quantity", low=1)
        _money(line.get("unit_price"), f"lines[{index}].unit_price")
        line_sum += _money(line.get("line_total"), f"lines[{index}].line_total")
    total = _money(body.get("total"), "total")
    if total != line_sum:
        raise _Invalid(f"total {total} differs from the sum of the line totals {line_sum}")
    currency = _text(body, "currency")
    if currency is None or len(currency) != 3 or not currency.isupper():
        raise _Invalid("currency must be a three-letter ISO 4217 code")
    invoice = {
        "invoice_number": f"INV-{len(state.invoices) + 1:06d}",
        "order_id": _integer(body, "order_id", low=1),
        "order_number": _text(body, "order_number"),
        "customer_id": _integer(body, "customer_id", low=1),
        "customer_email": _text(body, "customer_email", optional=True),
        "currency": currency,
        "total": body["total"],
        "lines": lines,
    }
    state.invoices[key] = invoice
    keys = ("invoice_number", "order_id", "currency", "total")
    return 201, {k: invoice[k] for k in keys}


def _availability(state: SandboxState, body: dict[str, Any]) -> Reply:
    items = body.get("items")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_ITEMS_PER_PUSH:
        raise _Invalid(f"items must be a list of 1 to {MAX_ITEMS_PER_PUSH} objects")
    figures: dict[str, int] = {}
    for index, item in enumerate(items):  # all checked before any is applied
        if not isinstance(item, dict):
            raise _Invalid(f"items[{index}] must be an object")
        sku = _text(item, "sku")
        assert sku is not None
        if sku in figures:
            raise _Invalid(f"items[{index}]: sku {sku!r} appears twice")
        _integer(item, "product_id", low=1)
        figures[sku] = _integer(item, "available")
    state.availability.update(figures)
    state.availability_pushes += len(figures)
    return 200, {"items": [{"sku": sku, "available": n} for sku, n in figures.items()]}


def _message(state: SandboxState, key: str, body: dict[str, Any]) -> Reply:
    if not isinstance(body.get("data", {}), dict):
        raise _Invalid("data must be an object")
    message = {
        "message_id": f"MSG-{len(state.notifications) + 1:06d}",
        "template": _text(body, "template"),
        "recipient": _text(body, "recipient"),
        "data": body.get("data", {}),
    }
    state.notifications[key] = message
    return 202, {"message_id": message["message_id"]}


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": code, "message": message}


def _decide(
    state: SandboxState,
    partner: str,
    signature: str | None,
    key: str | None,
    raw: bytes,
    parsed: Any,
    process: Callable[[dict[str, Any]], Reply],
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The partner's answer; runs under the lock and without awaits (see the module doc)."""
    secret = state.secrets.get(partner)
    if secret and (not signature or not verify(secret, raw, signature, time.time())):
        return 401, _error("bad_signature", f"{SIGNATURE_HEADER} missing or wrong"), {}
    if not key:
        return 400, _error("missing_idempotency_key", "Idempotency-Key is required"), {}
    failure = state.injected_failure(partner, key)
    if failure is not None:
        status, headers = failure
        return status, _error("injected", "sandbox: injected failure"), headers
    if not isinstance(parsed, dict):
        return 400, _error("bad_json", "body must be a JSON object"), {}
    if (stored := state.replies.get((partner, key))) is not None:
        first_body, (status, reply) = stored
        if first_body != parsed:
            message = "Idempotency-Key reused with a different request"
            return 409, _error("idempotency_conflict", message), {}
        return status, reply, {"Idempotent-Replayed": "true"}
    try:
        status, reply = process(parsed)
    except _Invalid as exc:
        return 422, _error("invalid_request", str(exc)), {}
    state.replies[(partner, key)] = (parsed, (status, reply))
    return status, reply, {}


def _process(state: SandboxState, partner: str, key: str) -> Callable[[dict[str, Any]], Reply]:
    if partner == "invoicing":
        return lambda body: _invoice(state, key, body)
    if partner == "shop":
        return lambda body: _availability(state, body)
    return lambda body: _message(state, key, body)


#: (method, path) → partner, for the partner APIs (``_partner_endpoints``).
PARTNER_ROUTES = {
    ("POST", "/v1/invoices"): "invoicing",
    ("PUT", "/v1/availability"): "shop",
    ("POST", "/v1/messages"): "notifications",
}
_PARTNER_PATHS = {path: method for method, path in PARTNER_ROUTES}
_SIGNATURE = SIGNATURE_HEADER.lower().encode()
_KEY = b"idempotency-key"


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _respond(send: Send, status: int, body: Any, headers: dict[str, str]) -> None:
    raw = orjson.dumps(body)
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw})


def _partner_endpoints(control: Starlette, state: SandboxState) -> ASGIApp:
    """The three partner APIs as a bare ASGI app, in front of the Starlette app that serves the
    control API. A partner call is all the sandbox does under load, and Starlette's request,
    routing and response objects were about half of its CPU per call."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        partner = PARTNER_ROUTES.get((scope.get("method", ""), scope.get("path", "")))
        if scope["type"] != "http" or partner is None:
            if scope["type"] == "http" and scope["path"] in _PARTNER_PATHS:
                allowed = {"Allow": _PARTNER_PATHS[scope["path"]]}
                await _respond(send, 405, _error("method_not_allowed", "wrong method"), allowed)
                return
            await control(scope, receive, send)
            return
        arrived = time.time()
        signature = key = None
        for name, value in scope["headers"]:
            if name == _SIGNATURE:
                signature = value.decode("latin-1")
            elif name == _KEY:
                key = value.decode("latin-1")
        raw = await _read_body(receive)
        try:
            parsed: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = None
        latency_ms = state.config[partner].latency_ms
        if latency_ms:
            await asyncio.sleep(latency_ms / 1000)
        process = _process(state, partner, key or "")
        method, path = scope["method"], scope["path"]
        with state.lock:
            status, body, headers = _decide(state, partner, signature, key, raw, parsed, process)
            call = {
                "partner": partner,
                "method": method,
                "path": path,
                "idempotency_key": key,
                "status": status,
                "replayed": "Idempotent-Replayed" in headers,
            }
            state.calls.append({**call, "at": arrived, "body": parsed})
        log.info("sandbox.call", **call)
        await _respond(send, status, body, headers)

    return app


async def _config(request: Request) -> Response:
    state: SandboxState = request.app.state.sandbox
    if request.method == "POST":
        try:
            partner, changes = _check_config(orjson.loads(await request.body()))
        except (orjson.JSONDecodeError, ValueError) as exc:
            return _json(_error("bad_config", str(exc)), 400)
        with state.lock:
            state.configure(partner, changes)
        log.info("sandbox.configured", partner=partner, **changes)
    with state.lock:
        return _json(state.config_json())


async def _reset(request: Request) -> Response:
    state: SandboxState = request.app.state.sandbox
    with state.lock:
        state.reset()
    log.info("sandbox.reset")
    return _json({"ok": True})


async def _calls(request: Request) -> Response:
    state: SandboxState = request.app.state.sandbox
    with state.lock:
        return _json(list(state.calls))


async def _effects(request: Request) -> Response:
    state: SandboxState = request.app.state.sandbox
    with state.lock:
        return _json(state.effects_json())


async def _health(request: Request) -> Response:
    return _json({"ok": True})


def create_sandbox_app(secrets: dict[str, str | None] | None = None, *, seed: int = 0) -> ASGIApp:
    """The sandbox partner; ``secrets`` maps a partner name to its signing secret (or None).

    A partner with a secret answers 401 to requests without a valid ``X-QM-Signature``; one
    without (None or absent) accepts any signature. ``quartermaster dev`` and ``quartermaster
    sandbox`` pass :func:`secrets_from_settings`, so every partner checks signatures there. ``seed``
    makes the random failures of ``error_rate``/``rate_429`` repeat from run to run.
    """
    unknown = set(secrets or {}) - set(PARTNERS)
    if unknown:
        raise ValueError(f"unknown partner(s) in secrets: {', '.join(sorted(unknown))}")
    control = Starlette(
        routes=[
            Route("/_sandbox/config", _config, methods=["GET", "POST"]),
            Route("/_sandbox/reset", _reset, methods=["POST"]),
            Route("/_sandbox/calls", _calls, methods=["GET"]),
            Route("/_sandbox/effects", _effects, methods=["GET"]),
            Route("/_sandbox/health", _health, methods=["GET"]),
        ]
    )
    state = control.state.sandbox = SandboxState(dict(secrets or {}), seed)
    return _partner_endpoints(control, state)


def secrets_from_settings(partners: PartnersSettings) -> dict[str, str | None]:
    """The sandbox secrets that match the clients built from the same settings: each partner's
    own secret, else the development one (the sandbox then verifies every request)."""
    return {name: partners.signing_secret(name) for name in PARTNERS}


def point_at_sandbox(partners: PartnersSettings, base_url: str) -> PartnersSettings:
    """``partners`` with every partner that has no URL of its own sent to the sandbox.

    One sandbox serves all three APIs (their paths do not overlap), so one base URL does.
    """

    def fill(partner: PartnerSettings) -> PartnerSettings:
        return partner if partner.url else dataclasses.replace(partner, url=base_url)

    return dataclasses.replace(
        partners,
        invoicing=fill(partners.invoicing),
        shop=fill(partners.shop),
        notifications=fill(partners.notifications),
    )


def sandbox_server(
    host: str = "127.0.0.1",
    port: int = 8100,
    *,
    secrets: dict[str, str | None] | None = None,
    seed: int = 0,
    log_level: str = "warning",
) -> uvicorn.Server:
    """A configured uvicorn server for the sandbox: ``await server.serve()`` runs it until
    ``server.should_exit`` is set (uvicorn installs its signal handlers only on the main thread,
    so it may also run in a background thread); ``server.started`` says when it listens."""
    config = uvicorn.Config(
        create_sandbox_app(secrets, seed=seed),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        lifespan="off",
    )
    return uvicorn.Server(config)


async def serve_sandbox(
    host: str = "127.0.0.1",
    port: int = 8100,
    *,
    secrets: dict[str, str | None] | None = None,
    seed: int = 0,
    gc: GcSettings | None = None,
) -> None:
    """Run the sandbox until interrupted (the ``quartermaster sandbox`` command). It keeps up to
    ``MAX_RECORDED_CALLS`` calls and every reply in memory; ``gc`` (the API's policy) keeps
    full garbage collections from walking all of them, which would stall every call."""
    log.info("sandbox.starting", url=f"http://{host}:{port}")
    policy = GcPolicy(gc) if gc is not None else None
    if policy is not None:
        policy.start()
    try:
        await sandbox_server(host, port, secrets=secrets, seed=seed).serve()
    finally:
        if policy is not None:
            await policy.stop()

"""Partner clients against the sandbox partner over real HTTP (uvicorn on a free port).

No mocks: the sandbox is the same app ``quartermaster dev`` runs, so these tests also pin down
the behaviour workers and their tests rely on (idempotency, injected failures, effects).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from email.utils import formatdate
from typing import Any

import httpx
import orjson
import pytest
import pytest_asyncio
from click.testing import CliRunner

from quartermaster.cli import main as cli
from quartermaster.config import PartnerSettings, PartnersSettings, Settings
from quartermaster.integrations import (
    DEV_SIGNING_SECRET,
    SIGNATURE_HEADER,
    AvailabilityUpdate,
    Invoice,
    InvoiceLine,
    InvoiceRequest,
    InvoicingClient,
    Notification,
    NotificationClient,
    PermanentError,
    RetryableError,
    ShopClient,
    build_clients,
    sign,
    verify,
)
from quartermaster.integrations.errors import parse_retry_after
from quartermaster.integrations.sandbox import point_at_sandbox, sandbox_server
from quartermaster.integrations.shop.client import MAX_ITEMS_PER_PUSH, figures_digest
from tests.servers import free_port

SHOP_SECRET = "shop-test-secret"
#: Invoicing and notifications check the development secret, the one default settings sign with.
DEV = DEV_SIGNING_SECRET
SANDBOX_SECRETS: dict[str, str | None] = {
    "invoicing": DEV,
    "shop": SHOP_SECRET,
    "notifications": DEV,
}


@pytest.fixture(scope="module")
def sandbox() -> Iterator[str]:
    """The sandbox on 127.0.0.1 in a background thread; every partner checks signatures."""
    port = free_port()
    server = sandbox_server("127.0.0.1", port, secrets=SANDBOX_SECRETS, seed=42)
    thread = threading.Thread(target=asyncio.run, args=(server.serve(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "sandbox server exited early"
        assert time.monotonic() < deadline, "sandbox server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest_asyncio.fixture
async def control(sandbox: str) -> AsyncIterator[httpx.AsyncClient]:
    """The sandbox's control API, reset before each test."""
    async with httpx.AsyncClient(base_url=sandbox, timeout=5) as http:
        (await http.post("/_sandbox/reset")).raise_for_status()
        yield http


async def configure(control: httpx.AsyncClient, **changes: Any) -> None:
    response = await control.post("/_sandbox/config", json=changes)
    assert response.status_code == 200, response.text


async def effects(control: httpx.AsyncClient) -> dict[str, Any]:
    body: dict[str, Any] = (await control.get("/_sandbox/effects")).json()
    return body


async def calls(control: httpx.AsyncClient) -> list[dict[str, Any]]:
    body: list[dict[str, Any]] = (await control.get("/_sandbox/calls")).json()
    return body


def invoice_request(order_id: int = 7, total: str = "25.00") -> InvoiceRequest:
    return InvoiceRequest(
        order_id=order_id,
        order_number=f"SO-{order_id:06d}",
        customer_id=3,
        customer_email="buyer@example.com",
        currency="EUR",
        total=total,
        lines=[
            InvoiceLine(sku="BOLT-1", quantity=2, unit_price="5.00", line_total="10.00"),
            InvoiceLine(sku="NUT-9", quantity=3, unit_price="5.00", line_total="15.00"),
        ],
    )


# --- round trips and idempotency ---------------------------------------------------------------


async def test_invoice_round_trip_and_idempotent_repeat(
    sandbox: str, control: httpx.AsyncClient
) -> None:
    async with InvoicingClient(sandbox, signing_secret=DEV) as client:
        first = await client.create_invoice(invoice_request(), "invoice:order-7")
        again = await client.create_invoice(invoice_request(), "invoice:order-7")
        other = await client.create_invoice(invoice_request(8), "invoice:order-8")

    assert first == again == Invoice(invoice_number="INV-000001")
    assert other.invoice_number == "INV-000002"
    seen = await effects(control)
    assert seen["counts"] == {"invoices": 2, "notifications": 0, "availability_pushes": 0}
    stored = seen["invoices"]["invoice:order-7"]
    assert stored["invoice_number"] == "INV-000001"
    assert (stored["order_id"], stored["total"], len(stored["lines"])) == (7, "25.00", 2)
    recorded = await calls(control)
    assert [(c["status"], c["replayed"]) for c in recorded] == [
        (201, False),
        (201, True),
        (201, False),
    ]
    assert recorded[0]["partner"] == "invoicing"
    assert recorded[0]["method"] == "POST"
    assert recorded[0]["path"] == "/v1/invoices"
    assert recorded[0]["idempotency_key"] == "invoice:order-7"
    assert recorded[0]["body"]["order_number"] == "SO-000007"


async def test_signed_shop_push_round_trips(sandbox: str, control: httpx.AsyncClient) -> None:
    updates = [
        AvailabilityUpdate(product_id=11, sku="KIT 10/B", available=42),
        AvailabilityUpdate(product_id=12, sku="S-2", available=0),
    ]
    async with ShopClient(sandbox, signing_secret=SHOP_SECRET, api_key="k") as client:
        acks = await client.push_availability(updates, "shop:11:v1")
        await client.push_availability(updates, "shop:11:v1")

    assert [(a.sku, a.available) for a in acks] == [("KIT 10/B", 42), ("S-2", 0)]
    seen = await effects(control)
    assert seen["availability"] == {"KIT 10/B": 42, "S-2": 0}
    assert seen["counts"]["availability_pushes"] == 2, "the repeat was a replay"
    recorded = await calls(control)
    assert [(c["method"], c["path"], c["replayed"]) for c in recorded] == [
        ("PUT", "/v1/availability", False),
        ("PUT", "/v1/availability", True),
    ]


async def test_shop_push_limits_are_checked_on_both_sides(
    sandbox: str, control: httpx.AsyncClient
) -> None:
    too_many = [AvailabilityUpdate(i, f"S-{i}", 1) for i in range(1, MAX_ITEMS_PER_PUSH + 2)]
    twice = [AvailabilityUpdate(1, "S-1", 1), AvailabilityUpdate(2, "S-1", 2)]
    async with ShopClient(sandbox, signing_secret=SHOP_SECRET) as client:
        for updates in ([], too_many, twice):
            with pytest.raises(ValueError):
                await client.push_availability(updates, "shop:x")
    assert await calls(control) == [], "refused before anything was sent"

    # The sandbox refuses the same bodies (a client that does not check), and applies nothing.
    for items, message in (
        ([], "items must be a list of 1 to 100"),
        ([u.to_json() for u in too_many], "items must be a list of 1 to 100"),
        ([u.to_json() for u in twice], "appears twice"),
        ([{"product_id": 1, "sku": "S-1", "available": -1}], "available must be an integer"),
        ([{"product_id": 1, "sku": "S-1", "available": 1}, "x"], "items[1] must be an object"),
    ):
        body = orjson.dumps({"items": items})
        headers = {"Idempotency-Key": f"k-{len(items)}-{message}"}
        headers[SIGNATURE_HEADER] = sign(SHOP_SECRET, body, int(time.time()))
        response = await control.put("/v1/availability", content=body, headers=headers)
        assert response.status_code == 422, items
        assert message in response.json()["message"]
    assert (await effects(control))["availability"] == {}


def test_figures_digest_names_the_figures_not_their_order() -> None:
    a, b = AvailabilityUpdate(1, "A", 3), AvailabilityUpdate(2, "B", 4)
    assert figures_digest([a, b]) == figures_digest([b, a])
    assert figures_digest([a, b]) != figures_digest([a, AvailabilityUpdate(2, "B", 5)])
    assert len(figures_digest([a])) == 16


async def test_notification_round_trips(sandbox: str, control: httpx.AsyncClient) -> None:
    message = Notification("order_confirmed", "buyer@example.com", {"order": "SO-000007"})
    async with NotificationClient(sandbox, signing_secret=DEV) as client:
        receipt = await client.send(message, "notify:order-7:confirmed")

    assert receipt.message_id == "MSG-000001"
    stored = (await effects(control))["notifications"]["notify:order-7:confirmed"]
    assert stored["template"] == "order_confirmed"
    assert stored["data"] == {"order": "SO-000007"}


# --- failures ----------------------------------------------------------------------------------


async def test_503_is_retryable_and_has_no_side_effect(
    sandbox: str, control: httpx.AsyncClient
) -> None:
    await configure(control, partner="invoicing", fail_next=1)
    async with InvoicingClient(sandbox, signing_secret=DEV) as client:
        with pytest.raises(RetryableError) as caught:
            await client.create_invoice(invoice_request(), "invoice:order-7")
        assert (await effects(control))["counts"]["invoices"] == 0
        retried = await client.create_invoice(invoice_request(), "invoice:order-7")

    error = caught.value
    assert (error.partner, error.status, error.retry_after) == ("invoicing", 503, None)
    assert str(error) == "invoicing: 503 Service Unavailable: sandbox: injected failure"
    assert retried.invoice_number == "INV-000001"
    assert (await effects(control))["counts"]["invoices"] == 1


async def test_429_carries_retry_after(sandbox: str, control: httpx.AsyncClient) -> None:
    await configure(control, partner="notifications", rate_429=1.0, retry_after_s=2)
    async with NotificationClient(sandbox, signing_secret=DEV) as client:
        with pytest.raises(RetryableError) as caught:
            await client.send(Notification("t", "r@example.com", {}), "notify:1")

    assert (caught.value.status, caught.value.retry_after) == (429, 2)
    assert (await effects(control))["counts"]["notifications"] == 0


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (408, RetryableError),
        (500, RetryableError),
        (502, RetryableError),
        (400, PermanentError),
        (404, PermanentError),
        (409, PermanentError),
    ],
)
async def test_status_classification(
    sandbox: str, control: httpx.AsyncClient, status: int, error_type: type[Exception]
) -> None:
    await configure(control, partner="*", fail_next=1, error_status=status)
    async with ShopClient(sandbox, signing_secret=SHOP_SECRET) as client:
        with pytest.raises(error_type) as caught:
            await client.push_availability([AvailabilityUpdate(1, "S-1", 5)], "shop:1")
    assert getattr(caught.value, "status", None) == status


async def test_invalid_request_is_permanent(sandbox: str, control: httpx.AsyncClient) -> None:
    async with InvoicingClient(sandbox, signing_secret=DEV) as client:
        with pytest.raises(PermanentError) as caught:
            await client.create_invoice(invoice_request(total="26.00"), "invoice:order-7")

    assert caught.value.status == 422
    assert "differs from the sum of the line totals" in str(caught.value)
    assert (await effects(control))["counts"]["invoices"] == 0


async def test_wrong_or_missing_signature_is_401(sandbox: str, control: httpx.AsyncClient) -> None:
    update = AvailabilityUpdate(product_id=1, sku="S-1", available=5)
    # The development secret is not the shop's: signed, but with the wrong secret.
    for secret in ("not-the-secret", DEV):
        async with ShopClient(sandbox, signing_secret=secret) as client:
            with pytest.raises(PermanentError) as caught:
                await client.push_availability([update], "shop:1")
        assert caught.value.status == 401
        assert str(caught.value).startswith("shop: 401 Unauthorized")
    # Unsigned (a client cannot send that; plain HTTP can), for every partner.
    body = b'{"items": [{"product_id": 1, "sku": "S-1", "available": 5}]}'
    for method, path in (("PUT", "/v1/availability"), ("POST", "/v1/invoices"),
                         ("POST", "/v1/messages")):  # fmt: skip
        response = await control.request(
            method, path, content=body, headers={"Idempotency-Key": "k-unsigned"}
        )
        assert response.status_code == 401, path
        assert response.json()["error"] == "bad_signature"
    seen = await effects(control)
    assert seen["counts"] == {"invoices": 0, "notifications": 0, "availability_pushes": 0}


async def test_timeout_is_retryable(sandbox: str, control: httpx.AsyncClient) -> None:
    await configure(control, partner="notifications", latency_ms=500)
    async with NotificationClient(sandbox, signing_secret=DEV, timeout=0.1) as client:
        with pytest.raises(RetryableError) as caught:
            await client.send(Notification("t", "r@example.com", {}), "notify:slow")

    assert caught.value.status is None
    assert str(caught.value) == "notifications: timed out (ReadTimeout)"
    # Like a real partner, the sandbox still acts on the request the client gave up on; wait
    # for it so it cannot land in the next test's records.
    deadline = time.monotonic() + 5
    while not await calls(control):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert (await effects(control))["counts"]["notifications"] == 1


async def test_unreachable_partner_is_retryable() -> None:
    async with InvoicingClient(f"http://127.0.0.1:{free_port()}", signing_secret=DEV) as client:
        with pytest.raises(RetryableError) as caught:
            await client.create_invoice(invoice_request(), "invoice:order-7")
    assert caught.value.status is None
    assert str(caught.value) == "invoicing: connection failed (ConnectError)"


async def test_fail_next_fails_exactly_n_requests(sandbox: str, control: httpx.AsyncClient) -> None:
    await configure(control, partner="invoicing", fail_next=2, error_status=502)
    async with InvoicingClient(sandbox, signing_secret=DEV) as client:
        for _ in range(2):
            with pytest.raises(RetryableError):
                await client.create_invoice(invoice_request(), "invoice:order-7")
        await client.create_invoice(invoice_request(), "invoice:order-7")

    assert [c["status"] for c in await calls(control)] == [502, 502, 201]
    assert (await effects(control))["counts"]["invoices"] == 1


async def test_poison_keys_fail_forever_while_others_pass(
    sandbox: str, control: httpx.AsyncClient
) -> None:
    await configure(control, partner="invoicing", poison_keys=["order-13"])
    async with InvoicingClient(sandbox, signing_secret=DEV) as client:
        for _ in range(3):
            with pytest.raises(RetryableError):
                await client.create_invoice(invoice_request(13), "invoice:order-13")
        healthy = await client.create_invoice(invoice_request(14), "invoice:order-14")

    assert healthy.invoice_number == "INV-000001"
    assert list((await effects(control))["invoices"]) == ["invoice:order-14"]


async def test_random_failures_repeat_after_a_reset(
    sandbox: str, control: httpx.AsyncClient
) -> None:
    async def run() -> list[int]:
        await configure(control, partner="notifications", error_rate=0.4, rate_429=0.2)
        async with NotificationClient(sandbox, signing_secret=DEV) as client:
            for n in range(30):
                with contextlib.suppress(RetryableError):
                    await client.send(Notification("t", "r@example.com", {}), f"notify:{n}")
        return [c["status"] for c in await calls(control)]

    first = await run()
    (await control.post("/_sandbox/reset")).raise_for_status()
    assert await run() == first
    assert {202, 429, 503} <= set(first)


async def test_sandbox_rejects_bad_requests(sandbox: str, control: httpx.AsyncClient) -> None:
    body = b'{"template": "t", "recipient": "r"}'

    def signed_by_dev(content: bytes) -> dict[str, str]:
        return {SIGNATURE_HEADER: sign(DEV, content, int(time.time()))}

    no_key = await control.post("/v1/messages", content=body, headers=signed_by_dev(body))
    assert no_key.status_code == 400
    assert no_key.json()["error"] == "missing_idempotency_key"

    headers = {"Idempotency-Key": "k1"}
    first = await control.post("/v1/messages", content=body, headers=headers | signed_by_dev(body))
    assert first.status_code == 202
    changed = b'{"template": "other", "recipient": "r"}'
    reused = await control.post(
        "/v1/messages", content=changed, headers=headers | signed_by_dev(changed)
    )
    assert reused.status_code == 409

    signed = {**headers, SIGNATURE_HEADER: sign("wrong", body, int(time.time()))}
    unsigned = await control.put("/v1/availability", content=body, headers=signed)
    assert unsigned.status_code == 401

    bad_config = await control.post("/_sandbox/config", json={"error_rate": 2})
    assert bad_config.status_code == 400
    assert "error_rate" in bad_config.json()["message"]
    assert (await control.post("/_sandbox/config", json={"nope": 1})).status_code == 400


# --- client plumbing ---------------------------------------------------------------------------


async def test_on_call_reports_latency_and_outcome(
    sandbox: str, control: httpx.AsyncClient
) -> None:
    seen: list[tuple[str, float, str]] = []
    await configure(control, partner="invoicing", fail_next=1)
    async with InvoicingClient(
        sandbox, signing_secret=DEV, on_call=lambda *call: seen.append(call)
    ) as client:
        with pytest.raises(RetryableError):
            await client.create_invoice(invoice_request(), "invoice:order-7")
        await client.create_invoice(invoice_request(), "invoice:order-7")

    assert [(partner, outcome) for partner, _, outcome in seen] == [
        ("invoicing", "retryable"),
        ("invoicing", "ok"),
    ]
    assert all(0 < seconds < 5 for _, seconds, _ in seen)


async def test_idempotency_key_is_required() -> None:
    async with InvoicingClient("http://127.0.0.1:1", signing_secret=DEV) as client:
        with pytest.raises(ValueError, match="idempotency key"):
            await client.create_invoice(invoice_request(), "")


async def test_build_clients_follows_the_settings(sandbox: str) -> None:
    only_invoicing = PartnersSettings(invoicing=PartnerSettings(url=sandbox), timeout_s=1.5)
    async with build_clients(only_invoicing) as clients:
        assert isinstance(clients.invoicing, InvoicingClient)
        assert clients.shop is None and clients.notifications is None

    everything = point_at_sandbox(PartnersSettings(), sandbox)
    async with build_clients(everything) as clients:
        assert clients.notifications is not None
        receipt = await clients.notifications.send(Notification("t", "r", {}), "notify:b")
        assert receipt.message_id.startswith("MSG-")


def test_partner_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QM_SHOP_URL", "http://shop.example")
    monkeypatch.setenv("QM_SHOP_API_KEY", "key-1")
    monkeypatch.setenv("QM_PARTNER_TIMEOUT_S", "3")
    monkeypatch.setenv("QM_INVOICING_SIGNING_SECRET", "inv-secret-1")
    partners = PartnersSettings.from_env()
    assert partners.shop == PartnerSettings("http://shop.example", "key-1", None)
    assert partners.timeout_s == 3.0
    assert "key-1" not in repr(partners)
    assert "inv-secret-1" not in repr(partners)
    assert partners.signing_secret("invoicing") == "inv-secret-1"
    # No secret configured: the documented development secret, so requests are still signed.
    assert partners.signing_secret("shop") == DEV_SIGNING_SECRET


# --- signing is always on; production insists on real secrets ----------------------------------


async def test_default_configuration_signs(
    sandbox: str, control: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings with no signing secret at all (dev, tests) sign with the development secret:
    a sandbox that checks it accepts the calls, one that checks another secret refuses them."""
    for name in ("QM_ENV", "QM_INVOICING_SIGNING_SECRET", "QM_SHOP_SIGNING_SECRET",
                 "QM_NOTIFY_SIGNING_SECRET"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    partners = point_at_sandbox(Settings.from_env().partners, sandbox)
    assert not partners.production
    async with build_clients(partners) as clients:
        assert clients.invoicing and clients.shop and clients.notifications
        invoice = await clients.invoicing.create_invoice(invoice_request(), "invoice:order-7")
        receipt = await clients.notifications.send(Notification("t", "r", {}), "notify:d")
        with pytest.raises(PermanentError) as caught:  # the sandbox's shop wants SHOP_SECRET
            await clients.shop.push_availability([AvailabilityUpdate(1, "S-1", 5)], "shop:d")

    assert invoice.invoice_number == "INV-000001"
    assert receipt.message_id == "MSG-000001"
    assert caught.value.status == 401
    assert [c["status"] for c in await calls(control)] == [201, 202, 401]


def test_a_client_cannot_be_built_without_a_secret() -> None:
    with pytest.raises(ValueError, match="signing secret is required"):
        ShopClient("http://127.0.0.1:1", signing_secret="")


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        (None, "QM_SHOP_SIGNING_SECRET must be set when QM_ENV=production and QM_SHOP_URL is set"),
        (DEV_SIGNING_SECRET, "QM_SHOP_SIGNING_SECRET must be the secret agreed with the partner"),
    ],
)
def test_production_refuses_a_missing_or_development_secret(
    monkeypatch: pytest.MonkeyPatch, secret: str | None, message: str
) -> None:
    for name in ("QM_INVOICING_URL", "QM_NOTIFY_URL", "QM_INVOICING_SIGNING_SECRET",
                 "QM_SHOP_SIGNING_SECRET", "QM_NOTIFY_SIGNING_SECRET"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QM_ENV", "production")
    monkeypatch.setenv("QM_AUTH_SECRET", "p" * 40)
    monkeypatch.setenv("QM_SHOP_URL", "http://127.0.0.1:1")
    if secret is not None:
        monkeypatch.setenv("QM_SHOP_SIGNING_SECRET", secret)
    partners = Settings.from_env().partners
    assert partners.production
    with pytest.raises(ValueError, match=message):
        build_clients(partners)

    # The worker refuses to start: nothing is connected or consumed before the check.
    monkeypatch.setenv("QM_DATABASE_URL", "postgresql://qm@127.0.0.1:1/qm")
    monkeypatch.setenv("QM_REDIS_URL", "redis://127.0.0.1:1/0")
    result = CliRunner().invoke(cli, ["worker"])
    assert result.exit_code == 1  # a one-line error (click), not a traceback
    assert isinstance(result.exception, SystemExit)
    assert message in result.output


async def test_production_builds_clients_with_own_secrets() -> None:
    partners = PartnersSettings(
        shop=PartnerSettings(url="http://127.0.0.1:1", signing_secret="s" * 40),
        production=True,
    )
    async with build_clients(partners) as clients:
        assert clients.shop is not None
        # A partner without a URL is never called, so it needs no secret.
        assert clients.invoicing is None and clients.notifications is None
    assert partners.signing_secret("shop") == "s" * 40


# --- signing and Retry-After -------------------------------------------------------------------


def test_signature_round_trip_and_tampering() -> None:
    body = b'{"order_id": 7}'
    now = 1_700_000_000
    header = sign("s3cret", body, now)
    assert header.startswith(f"t={now},v1=")
    assert verify("s3cret", body, header, now=now + 10)
    assert not verify("s3cret", b'{"order_id": 8}', header, now=now)
    assert not verify("other", body, header, now=now)
    assert not verify("s3cret", body, header, now=now + 301)
    assert not verify("s3cret", body, "garbage", now=now)
    assert not verify("s3cret", body, f"t=abc,v1={header.split('v1=')[1]}", now=now)
    # During a secret rotation either signature may match.
    rotated = header + ",v1=" + sign("old", body, now).split("v1=")[1]
    assert verify("old", body, rotated, now=now)


def test_retry_after_parsing() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == 30.0
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0
    for bad in (None, "", "-1", "soon", "nan"):
        assert parse_retry_after(bad) is None


async def test_partner_paths_refuse_other_methods(control: httpx.AsyncClient) -> None:
    for method, path, allowed in (
        ("GET", "/v1/invoices", "POST"),
        ("POST", "/v1/availability", "PUT"),
        ("DELETE", "/v1/messages", "POST"),
    ):
        response = await control.request(method, path)
        assert response.status_code == 405, (method, path)
        assert response.headers["allow"] == allowed
        assert response.json()["error"] == "method_not_allowed"
    assert (await control.get("/v1/nothing")).status_code == 404
    assert await calls(control) == []

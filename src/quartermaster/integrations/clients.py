"""Build the partner clients a worker process needs from the settings, and close them together."""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Self, TypeVar

from quartermaster.config import PartnersSettings
from quartermaster.integrations.base import OnCall, PartnerClient
from quartermaster.integrations.invoicing.client import InvoicingClient
from quartermaster.integrations.notifications.client import NotificationClient
from quartermaster.integrations.shop.client import ShopClient

C = TypeVar("C", bound=PartnerClient)


@dataclass(frozen=True, slots=True)
class Clients:
    """One client per configured partner; None for a partner without a URL (not called)."""

    invoicing: InvoicingClient | None
    shop: ShopClient | None
    notifications: NotificationClient | None

    async def aclose(self) -> None:
        for client in (self.invoicing, self.shop, self.notifications):
            if client is not None:
                await client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _build(cls: type[C], name: str, partners: PartnersSettings, on_call: OnCall | None) -> C | None:
    partner = partners.partner(name)
    if not partner.url:
        return None
    return cls(
        partner.url,
        api_key=partner.api_key,
        signing_secret=partners.signing_secret(name),
        timeout=partners.timeout_s,
        connect_timeout=partners.connect_timeout_s,
        on_call=on_call,
    )


def build_clients(partners: PartnersSettings, on_call: OnCall | None = None) -> Clients:
    """The clients for ``partners``; ``on_call`` receives every call's latency and outcome.

    Raises ValueError before any client exists when ``partners.production`` and a partner with a
    URL has no signing secret of its own (so a production worker refuses to start).
    """
    partners.check_signing()
    return Clients(
        invoicing=_build(InvoicingClient, "invoicing", partners, on_call),
        shop=_build(ShopClient, "shop", partners, on_call),
        notifications=_build(NotificationClient, "notifications", partners, on_call),
    )

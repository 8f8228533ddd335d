"""The online shop: keeps its "in stock" numbers in step with our available quantities."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from quartermaster.integrations.base import PartnerClient, require


@dataclass(frozen=True, slots=True)
class AvailabilityUpdate:
    product_id: int
    sku: str
    #: The absolute number to show, not a delta: a repeated or reordered push converges.
    available: int

    def to_json(self) -> dict[str, Any]:
        return {"product_id": self.product_id, "sku": self.sku, "available": self.available}


@dataclass(frozen=True, slots=True)
class AvailabilityAck:
    sku: str
    available: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AvailabilityAck:
        return cls(sku=require(data, "sku", str), available=require(data, "available", int))


class ShopClient(PartnerClient):
    partner = "shop"

    async def push_availability(
        self, update: AvailabilityUpdate, idempotency_key: str
    ) -> AvailabilityAck:
        """Set the shop's available quantity for one SKU (PUT: the last write wins)."""
        return await self._call(
            "PUT",
            f"/v1/availability/{quote(update.sku, safe='')}",
            update.to_json(),
            idempotency_key=idempotency_key,
            parse=AvailabilityAck.from_json,
        )

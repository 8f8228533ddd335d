"""The online shop: keeps its "in stock" numbers in step with our available quantities."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from quartermaster.integrations.base import PartnerClient, require

#: The most SKUs one push may carry (the shop refuses more); longer lists go in several pushes.
MAX_ITEMS_PER_PUSH = 100


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


def figures_digest(updates: Sequence[AvailabilityUpdate]) -> str:
    """A short, stable name for exactly these figures (order-independent), for idempotency keys:
    a repeat of the same figures is a replay, newer figures are a new push."""
    text = ";".join(sorted(f"{u.sku}={u.available}" for u in updates))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ShopClient(PartnerClient):
    partner = "shop"

    async def push_availability(
        self, updates: Sequence[AvailabilityUpdate], idempotency_key: str
    ) -> list[AvailabilityAck]:
        """Set the shop's available quantities of 1 to ``MAX_ITEMS_PER_PUSH`` distinct SKUs in
        one request (PUT: the last write wins, per SKU); the shop applies all or none."""
        if not 1 <= len(updates) <= MAX_ITEMS_PER_PUSH:
            raise ValueError(f"a push carries 1 to {MAX_ITEMS_PER_PUSH} SKUs, not {len(updates)}")
        if len({u.sku for u in updates}) != len(updates):
            raise ValueError("a push carries each SKU once")

        def parse(answer: dict[str, Any]) -> list[AvailabilityAck]:
            items = require(answer, "items", list)
            acks = [AvailabilityAck.from_json(item) for item in items]
            if [a.sku for a in acks] != [u.sku for u in updates]:
                raise ValueError("the shop acknowledged other SKUs than it was sent")
            return acks

        return await self._call(
            "PUT",
            "/v1/availability",
            {"items": [u.to_json() for u in updates]},
            idempotency_key=idempotency_key,
            parse=parse,
        )

"""The notification service: sends templated e-mails (order confirmations, low stock, …)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quartermaster.integrations.base import PartnerClient, require


@dataclass(frozen=True, slots=True)
class Notification:
    template: str
    recipient: str
    #: Template variables; must be JSON-serialisable (orjson: str, numbers, dicts, lists, …).
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"template": self.template, "recipient": self.recipient, "data": self.data}


@dataclass(frozen=True, slots=True)
class NotificationReceipt:
    message_id: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NotificationReceipt:
        return cls(message_id=require(data, "message_id", str))


class NotificationClient(PartnerClient):
    partner = "notifications"

    async def send(self, notification: Notification, idempotency_key: str) -> NotificationReceipt:
        """Queue one message; a repeat with the same key is not sent a second time."""
        return await self._call(
            "POST",
            "/v1/messages",
            notification.to_json(),
            idempotency_key=idempotency_key,
            parse=NotificationReceipt.from_json,
        )

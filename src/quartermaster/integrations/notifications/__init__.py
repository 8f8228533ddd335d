"""Client of the notification service."""

from quartermaster.integrations.notifications.client import (
    Notification,
    NotificationClient,
    NotificationReceipt,
)

__all__ = ["Notification", "NotificationClient", "NotificationReceipt"]

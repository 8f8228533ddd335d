"""Client of the online shop's stock availability API."""

from quartermaster.integrations.shop.client import AvailabilityAck, AvailabilityUpdate, ShopClient

__all__ = ["AvailabilityAck", "AvailabilityUpdate", "ShopClient"]

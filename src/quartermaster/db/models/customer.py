from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, String
from sqlalchemy.orm import Mapped, mapped_column

from quartermaster.enums import CustomerTier

from .base import Base, created_at, enum_column, pk, updated_at


class Customer(Base):
    __tablename__ = "customers"

    id: Mapped[int] = pk()
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    email: Mapped[str] = mapped_column(String(320), nullable=False, unique=True)
    tier: Mapped[CustomerTier] = mapped_column(
        enum_column(CustomerTier, "customer_tier"), nullable=False, default=CustomerTier.STANDARD
    )
    created_at: Mapped[datetime] = created_at()
    updated_at: Mapped[datetime] = updated_at()

    __table_args__ = (
        Index("ix_customers_name_id", "name", "id"),
        Index("ix_customers_tier", "tier"),
    )

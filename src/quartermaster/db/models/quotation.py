from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from quartermaster.enums import QuotationStatus

from .base import Base, Money, created_at, enum_column, pk, updated_at


class Quotation(Base):
    __tablename__ = "quotations"

    id: Mapped[int] = pk()
    number: Mapped[str] = mapped_column(String(32), nullable=False, unique=True)
    customer_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("customers.id", ondelete="RESTRICT"), nullable=False
    )
    status: Mapped[QuotationStatus] = mapped_column(
        enum_column(QuotationStatus, "quotation_status"),
        nullable=False,
        default=QuotationStatus.DRAFT,
    )
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    subtotal: Mapped[Decimal] = mapped_column(Money, nullable=False)
    discount_total: Mapped[Decimal] = mapped_column(Money, nullable=False)
    total: Mapped[Decimal] = mapped_column(Money, nullable=False)
    valid_until: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    created_at: Mapped[datetime] = created_at()
    updated_at: Mapped[datetime] = updated_at()

    __table_args__ = (
        CheckConstraint("total = subtotal - discount_total", name="total_consistent"),
        Index("ix_quotations_customer_id_created_at_id", "customer_id", "created_at", "id"),
        Index("ix_quotations_created_at_id", "created_at", "id"),
        Index("ix_quotations_status_valid_until", "status", "valid_until"),
    )


class QuotationLine(Base):
    __tablename__ = "quotation_lines"

    id: Mapped[int] = pk()
    quotation_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("quotations.id", ondelete="CASCADE"), nullable=False
    )
    product_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("products.id", ondelete="RESTRICT"), nullable=False
    )
    quantity: Mapped[int] = mapped_column(Integer, nullable=False)
    unit_price: Mapped[Decimal] = mapped_column(Money, nullable=False)
    discount_percent: Mapped[Decimal] = mapped_column(Numeric(5, 2), nullable=False, default=0)
    line_total: Mapped[Decimal] = mapped_column(Money, nullable=False)

    __table_args__ = (
        CheckConstraint("quantity > 0", name="quantity_positive"),
        CheckConstraint(
            "discount_percent >= 0 AND discount_percent <= 100", name="discount_percent_range"
        ),
        UniqueConstraint("quotation_id", "product_id"),
        Index("ix_quotation_lines_quotation_id_id", "quotation_id", "id"),
        Index("ix_quotation_lines_product_id", "product_id"),
    )

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from quartermaster.enums import StockChangeReason

from .base import Base, created_at, enum_column, pk, updated_at


class StockLevel(Base):
    __tablename__ = "stock_levels"

    id: Mapped[int] = pk()
    product_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("products.id", ondelete="RESTRICT"), nullable=False
    )
    warehouse_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("warehouses.id", ondelete="RESTRICT"), nullable=False
    )
    on_hand: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    reserved: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    low_stock_threshold: Mapped[int] = mapped_column(Integer, nullable=False, default=10)
    updated_at: Mapped[datetime] = updated_at()

    __table_args__ = (
        UniqueConstraint("product_id", "warehouse_id"),
        CheckConstraint("0 <= reserved AND reserved <= on_hand", name="reserved_within_on_hand"),
        CheckConstraint("low_stock_threshold >= 0", name="threshold_non_negative"),
        Index("ix_stock_levels_warehouse_id_id", "warehouse_id", "id"),
        Index(
            "ix_stock_levels_low",
            "warehouse_id",
            "id",
            postgresql_where=text("on_hand - reserved <= low_stock_threshold"),
        ),
    )


class StockMovement(Base):
    """The ledger: every change of a stock level, so the levels can be re-derived and audited."""

    __tablename__ = "stock_movements"

    id: Mapped[int] = pk()
    stock_level_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("stock_levels.id", ondelete="RESTRICT"), nullable=False
    )
    reason: Mapped[StockChangeReason] = mapped_column(
        enum_column(StockChangeReason, "stock_change_reason"), nullable=False
    )
    on_hand_delta: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    reserved_delta: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    order_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("orders.id", ondelete="RESTRICT")
    )
    note: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = created_at()

    __table_args__ = (
        Index("ix_stock_movements_stock_level_id_id", "stock_level_id", "id"),
        Index("ix_stock_movements_order_id", "order_id"),
    )

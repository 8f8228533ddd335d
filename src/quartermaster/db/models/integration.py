from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.types import UserDefinedType

from quartermaster.enums import IntegrationKind, IntegrationStatus

from .base import Base, created_at, enum_column, pk, updated_at


class Xid8(UserDefinedType[int]):
    """PostgreSQL's 64-bit transaction id (``pg_current_xact_id()``)."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "xid8"


class IntegrationJob(Base):
    """One piece of partner work (invoice, shop sync, notification) and its delivery state."""

    __tablename__ = "integration_jobs"

    id: Mapped[int] = pk()
    kind: Mapped[IntegrationKind] = mapped_column(
        enum_column(IntegrationKind, "integration_kind"), nullable=False
    )
    status: Mapped[IntegrationStatus] = mapped_column(
        enum_column(IntegrationStatus, "integration_status"),
        nullable=False,
        default=IntegrationStatus.PENDING,
    )
    order_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("orders.id", ondelete="RESTRICT")
    )
    product_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("products.id", ondelete="RESTRICT")
    )
    idempotency_key: Mapped[str] = mapped_column(String(200), nullable=False, unique=True)
    payload: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    external_ref: Mapped[str | None] = mapped_column(String(200))
    #: The outbox event that caused the job (several jobs may share one).
    outbox_id: Mapped[int | None] = mapped_column(BigInteger)
    #: When the next automatic attempt is due (FAILED jobs waiting for their backoff).
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = created_at()
    updated_at: Mapped[datetime] = updated_at()

    __table_args__ = (
        Index("ix_integration_jobs_order_id_id", "order_id", "id"),
        Index("ix_integration_jobs_product_id", "product_id"),
        Index("ix_integration_jobs_status", "status"),
    )


class OutboxEvent(Base):
    """Transactional outbox: written with the business rows, relayed to Redis after commit."""

    __tablename__ = "outbox"

    id: Mapped[int] = pk()
    topic: Mapped[str] = mapped_column(String(100), nullable=False)
    key: Mapped[str | None] = mapped_column(String(200))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    created_at: Mapped[datetime] = created_at()
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: The writing transaction (diagnostics: which rows one transaction wrote). The relay no
    #: longer gates on it; ``db/repositories/integration.py`` explains the order it keeps.
    txid: Mapped[int] = mapped_column(
        Xid8(), nullable=False, server_default=text("pg_current_xact_id()")
    )

    __table_args__ = (
        Index("ix_outbox_unpublished", "id", postgresql_where=text("published_at IS NULL")),
        Index("ix_outbox_published_at", "published_at"),
    )

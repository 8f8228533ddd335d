"""outbox rows remember their transaction, so the relay can publish in commit order

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 08:00:00

An outbox row becomes visible when its transaction commits, not when its id was drawn. The relay
first used ``txid`` to publish only rows older than every running transaction; it now claims
every committed unpublished row in id order (``db/repositories/integration.py`` explains why
that keeps the order per stock level), and ``txid`` stays as a diagnostic: which rows one
transaction wrote.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE outbox ADD COLUMN txid xid8 NOT NULL DEFAULT pg_current_xact_id()")
    op.execute("ALTER TABLE integration_jobs ADD COLUMN outbox_id bigint")
    op.execute("ALTER TABLE integration_jobs ADD COLUMN next_attempt_at timestamptz")


def downgrade() -> None:
    op.execute("ALTER TABLE integration_jobs DROP COLUMN next_attempt_at")
    op.execute("ALTER TABLE integration_jobs DROP COLUMN outbox_id")
    op.execute("ALTER TABLE outbox DROP COLUMN txid")

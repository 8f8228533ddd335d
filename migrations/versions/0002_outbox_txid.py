"""outbox rows remember their transaction, so the relay can publish in commit order

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 08:00:00

An outbox row becomes visible when its transaction commits, not when its id was drawn: a relay
that read ``WHERE id > last`` could skip a row whose transaction committed late. The relay only
publishes rows whose transaction is older than every transaction still running
(``txid < pg_snapshot_xmin(pg_current_snapshot())``), so nothing earlier can still appear.
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

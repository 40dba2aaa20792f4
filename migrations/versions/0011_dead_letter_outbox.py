"""Dead letters not yet on the dead-letter topic.

The sink publishes a batch's dead letters to ``usertrail.deadletter`` after
the batch's transaction commits. A publication that failed (a broker error,
or the sink killed between the commit and the send) left the dead letter in
the table only. Now the transaction writes it ``unpublished``, and the sink
publishes every unpublished one, oldest first, marking each once the broker
acknowledged it: after a batch with dead letters, and at its start (what a
sink killed before publishing left). Rows from before this revision were
published when they were written (or their publication failed, and was
logged): they count as published.

Revision ID: 0011_dead_letter_outbox
Revises: 0010_service_user_pairs
"""

from alembic import op

revision = "0011_dead_letter_outbox"
down_revision = "0010_service_user_pairs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
ALTER TABLE usertrail_dead_letters ADD COLUMN unpublished BOOLEAN NOT NULL DEFAULT false;
CREATE INDEX usertrail_dead_letters_unpublished_idx ON usertrail_dead_letters (id)
  WHERE unpublished;
""")


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS usertrail_dead_letters_unpublished_idx")
    op.execute("ALTER TABLE usertrail_dead_letters DROP COLUMN IF EXISTS unpublished")

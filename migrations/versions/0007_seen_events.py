"""Event ids the sink has applied that no product row keeps.

An interaction's id is its ``"UserInteraction"`` row's, so a resend of it
hits the primary key, however late. The other kinds write no row of their
own (a preferences change updates the user's one row, an erasure deletes):
their ids are kept here, and so are the ids of interactions an erasure
deleted. A resend of any of them, however late, changes nothing
(docs/architecture.md, rule 2). Ids only: nothing here names a user.

Revision ID: 0007_seen_events
Revises: 0006_in_flight
"""

from alembic import op

revision = "0007_seen_events"
down_revision = "0006_in_flight"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE TABLE usertrail_seen_events (
  id TEXT NOT NULL,
  CONSTRAINT usertrail_seen_events_pkey PRIMARY KEY (id)
);
""")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS usertrail_seen_events")

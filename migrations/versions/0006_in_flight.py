"""What each sink had in flight when it last read a partition.

Before a sink decodes a batch, it writes, per partition, the offsets the
batch holds (``usertrail_in_flight``, one row per consumer, topic and
partition, on a connection of its own). A row whose last offset is at or past
the partition's stored position names records a sink was handling when it
died: the next sink to read them handles them in smaller and smaller parts,
and a record the sink died on twice by itself becomes a dead letter
(reason ``crashed``) instead of killing every sink that reads it
(docs/architecture.md, rule 3).

Revision ID: 0006_in_flight
Revises: 0005_log_archive
"""

from alembic import op

revision = "0006_in_flight"
down_revision = "0005_log_archive"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE TABLE usertrail_in_flight (
  consumer TEXT NOT NULL,
  topic TEXT NOT NULL,
  partition INTEGER NOT NULL,
  first_offset BIGINT NOT NULL,
  last_offset BIGINT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 1,
  CONSTRAINT usertrail_in_flight_pkey PRIMARY KEY (consumer, topic, partition)
);
""")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS usertrail_in_flight")

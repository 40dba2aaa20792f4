"""The log archive and the identity of the log each stored position belongs to.

``usertrail_archive`` holds the raw records the sink read (offset, key,
value, timestamp, headers), a partition's records of one batch in one row
(``usertrail.sink.archive`` encodes them), written in the same transaction
as its positions: ``usertrail up`` restores them into a broker that lost them
(the embedded tansu keeps nothing across a restart). ``usertrail_positions.
topic_id`` is the broker's id of the topic a position was read from: a
recreated topic or a wiped broker has another id, and a consumer refuses to
go on from a position that belongs to a log that is gone (docs/log.md).

Revision ID: 0005_log_archive
Revises: 0004_pipeline_tables
"""

from alembic import op

revision = "0005_log_archive"
down_revision = "0004_pipeline_tables"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
ALTER TABLE usertrail_positions ADD COLUMN topic_id UUID;

CREATE TABLE usertrail_archive (
  topic TEXT NOT NULL,
  partition INTEGER NOT NULL,
  first_offset BIGINT NOT NULL,
  last_offset BIGINT NOT NULL,
  records INTEGER NOT NULL,
  data BYTEA NOT NULL,
  CONSTRAINT usertrail_archive_pkey PRIMARY KEY (topic, partition, first_offset)
);
""")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS usertrail_archive")
    op.execute("ALTER TABLE usertrail_positions DROP COLUMN IF EXISTS topic_id")

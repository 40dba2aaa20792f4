"""add_user_segments (seed 002, IA-002.1): segmentation columns on user_vectors.

The upgrade is the seed's SQL verbatim. The downgrade is its rollback plan;
the index is dropped first, because dropping "primarySegment" already drops
it and the seed's order would then fail on DROP INDEX. Every row and every
other column of user_vectors is kept.

Revision ID: 0003_add_user_segments
Revises: 0002_user_vectors
"""

from alembic import op

revision = "0003_add_user_segments"
down_revision = "0002_user_vectors"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
-- Add new columns to user_vectors table
ALTER TABLE "user_vectors"
ADD COLUMN "segments" JSONB,
ADD COLUMN "primarySegment" TEXT,
ADD COLUMN "segmentConfidence" DOUBLE PRECISION,
ADD COLUMN "lastSegmentUpdate" TIMESTAMP(3);

-- Add index for segment-based queries
CREATE INDEX "user_vectors_primarySegment_idx" ON "user_vectors"("primarySegment");
""")


def downgrade() -> None:
    op.execute('DROP INDEX IF EXISTS "user_vectors_primarySegment_idx"')
    op.execute("""
ALTER TABLE "user_vectors"
DROP COLUMN "segments",
DROP COLUMN "primarySegment",
DROP COLUMN "segmentConfidence",
DROP COLUMN "lastSegmentUpdate";
""")

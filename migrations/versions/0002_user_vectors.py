"""user_vectors: one affinity vector per user (the table seed 002 extends).

Revision ID: 0002_user_vectors
Revises: 0001_personalization
"""

from alembic import op

revision = "0002_user_vectors"
down_revision = "0001_personalization"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE TABLE "user_vectors" (
  "id" TEXT PRIMARY KEY,
  "userId" TEXT UNIQUE NOT NULL,
  "vector" JSONB NOT NULL DEFAULT '{}'::jsonb,
  "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
  "updatedAt" TIMESTAMP(3) NOT NULL,
  FOREIGN KEY ("userId") REFERENCES "User"("id") ON DELETE CASCADE
);
""")


def downgrade() -> None:
    op.execute('DROP TABLE IF EXISTS "user_vectors"')

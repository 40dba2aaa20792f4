"""add_personalization_models (seed 000): UserInteraction and UserPreferences.

The DDL is the seed's own SQL. "User" is created (minimal) only where the
product has none; such a table is marked with a comment, and only a marked
table is dropped on downgrade.

Revision ID: 0001_personalization
Revises:
"""

from alembic import op
from sqlalchemy import text

revision = "0001_personalization"
down_revision = None
branch_labels = None
depends_on = None

OURS = "usertrail: minimal User table, created because the database had none"


def upgrade() -> None:
    bind = op.get_bind()
    exists = bind.execute(text("SELECT to_regclass('\"User\"') IS NOT NULL")).scalar()
    if not exists:
        op.execute(
            'CREATE TABLE "User" (\n'
            '  "id" TEXT PRIMARY KEY,\n'
            '  "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP\n'
            ")"
        )
        op.execute(f"COMMENT ON TABLE \"User\" IS '{OURS}'")

    op.execute("""
CREATE TABLE "UserInteraction" (
  "id" TEXT PRIMARY KEY,
  "userId" TEXT NOT NULL,
  "createdAt" TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  "type" TEXT NOT NULL,  -- "reading", "chat", "feedback", "share"
  "service" TEXT NOT NULL,  -- "saju", "tarot", "astrology", etc.
  "theme" TEXT,  -- "love", "career", "health", etc.
  "rating" INTEGER,  -- 1-5
  "metadata" JSONB,
  FOREIGN KEY ("userId") REFERENCES "User"("id") ON DELETE CASCADE
);

CREATE INDEX "UserInteraction_userId_createdAt_idx" ON "UserInteraction"("userId", "createdAt");
CREATE INDEX "UserInteraction_userId_service_idx" ON "UserInteraction"("userId", "service");
CREATE INDEX "UserInteraction_userId_theme_idx" ON "UserInteraction"("userId", "theme");
""")
    op.execute("""
CREATE TABLE "UserPreferences" (
  "id" TEXT PRIMARY KEY,
  "userId" TEXT UNIQUE NOT NULL,
  "createdAt" TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  "updatedAt" TIMESTAMP,
  "preferredLanguage" TEXT DEFAULT 'en',
  "preferredThemes" JSONB,  -- ["love", "career"]
  "preferredServices" JSONB,  -- ["saju", "tarot"]
  "notificationSettings" JSONB,  -- {daily: true, weekly: false}
  "readingLength" TEXT DEFAULT 'medium',  -- "short", "medium", "long"
  "tonePreference" TEXT DEFAULT 'casual',  -- "casual", "formal", "mystical"
  FOREIGN KEY ("userId") REFERENCES "User"("id") ON DELETE CASCADE
);
""")


def downgrade() -> None:
    # The seed's rollback section.
    op.execute('DROP TABLE IF EXISTS "UserPreferences"')
    op.execute('DROP TABLE IF EXISTS "UserInteraction"')
    bind = op.get_bind()
    comment = bind.execute(
        text("SELECT obj_description(to_regclass('\"User\"'), 'pg_class')")
    ).scalar()
    if comment == OURS:
        op.execute('DROP TABLE "User"')

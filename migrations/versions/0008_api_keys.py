"""API keys of the HTTP collector (``usertrail keys``, collector/keys.py).

One row per key: the source its events are stamped with (never the body's),
the SHA-256 of its secret part (the key itself is shown once, at creation,
and stored nowhere), and when it was revoked.

Revision ID: 0008_api_keys
Revises: 0007_seen_events
"""

from alembic import op

revision = "0008_api_keys"
down_revision = "0007_seen_events"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE TABLE usertrail_api_keys (
  id TEXT NOT NULL,
  source TEXT NOT NULL,
  name TEXT,
  secret_sha256 TEXT NOT NULL,
  created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  revoked_at TIMESTAMPTZ,
  CONSTRAINT usertrail_api_keys_pkey PRIMARY KEY (id)
);
""")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS usertrail_api_keys")

"""The archive's records are stored as they come: the sink compresses them.

``usertrail_archive.data`` now holds an LZ4 block of a batch's records
(usertrail/archive.py), compressed by the sink. PostgreSQL's own compression
of the column (pglz, as TOAST stores a large value) took a fifth of the
sink's database time, and finds nothing left to save in an LZ4 block: the
column is stored out of line as it is (STORAGE EXTERNAL). Rows written
before, uncompressed by the sink and compressed by PostgreSQL, stay as they
are and are read as before.

Revision ID: 0012_archive_stored_as_is
Revises: 0011_dead_letter_outbox
"""

from alembic import op

revision = "0012_archive_stored_as_is"
down_revision = "0011_dead_letter_outbox"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE usertrail_archive ALTER COLUMN data SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.execute("ALTER TABLE usertrail_archive ALTER COLUMN data SET STORAGE EXTENDED")

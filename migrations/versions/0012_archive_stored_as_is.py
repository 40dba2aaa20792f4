"""The archive's records are stored as they come: the sink compresses them.

``usertrail_archive.data`` now holds an LZ4 block of a batch's records
(usertrail/archive.py), compressed by the sink. PostgreSQL's own compression
of the column (pglz, as TOAST stores a large value) took about a tenth of
the sink's statement time, and finds little to save in an LZ4 block: the
column is stored out of line as it is (STORAGE EXTERNAL). Rows written
before, uncompressed by the sink and compressed by PostgreSQL, stay as they
are and are read as before. Going back below this revision turns the rows
written since into the records as they are, which the code before it reads.

Revision ID: 0012_archive_stored_as_is
Revises: 0011_dead_letter_outbox
"""

import struct

import sqlalchemy as sa
from alembic import op
from cramjam import lz4

revision = "0012_archive_stored_as_is"
down_revision = "0011_dead_letter_outbox"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE usertrail_archive ALTER COLUMN data SET STORAGE EXTERNAL")


_COMPRESSED = sa.text(
    "SELECT topic, partition, first_offset, data FROM usertrail_archive "
    "WHERE (topic, partition, first_offset) > (:topic, :partition, :first) "
    "AND get_byte(data, 0) = 255 ORDER BY topic, partition, first_offset LIMIT 100"
)
_PUT_BACK = sa.text(
    "UPDATE usertrail_archive SET data = :data "
    "WHERE topic = :topic AND partition = :partition AND first_offset = :first"
)


def downgrade() -> None:
    # an LZ4 row: 0xff, the size of the records (uint32), their LZ4 block
    bind = op.get_bind()
    after = {"topic": "", "partition": -1, "first": -1}
    while rows := bind.execute(_COMPRESSED, after).fetchall():
        for topic, partition, first, data in rows:
            (size,) = struct.unpack_from(">I", data, 1)
            records = bytes(lz4.decompress_block(bytes(data[5:]), output_len=size))
            bind.execute(
                _PUT_BACK, {"data": records, "topic": topic, "partition": partition, "first": first}
            )
        after = {"topic": rows[-1][0], "partition": rows[-1][1], "first": rows[-1][2]}
    op.execute("ALTER TABLE usertrail_archive ALTER COLUMN data SET STORAGE EXTENDED")

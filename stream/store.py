"""The stream table's state on disk: faust's RocksDB store, told which
partition each read and write belongs to, and discarded after a stop that
was not clean.

Why not faust's ``rocksdb://`` as it is: its store keeps one database per
changelog partition and picks the partition of a read or write from the
event being processed (``current_event()``). The worker folds a batch of
many partitions at once (stream/folder.py), so that event is the batch's
last, and most users would be read from and written to another
partition's database. Here the folder names the partition
(``on_partition``), and only when it does not (a profile lookup, faust's own
recovery) does faust's logic apply. faust internals used here and nowhere
else: the store's ``_db_for_partition`` and ``_key_index``; a faust upgrade
that changes them fails ``tests/stream/test_store.py``.

Why a stop must be clean: the folder writes a batch's states to the store
at once and to the changelog as they are acknowledged (the applied offsets
last). A worker killed in between leaves the store ahead of the
changelog; restarted on that store it would take those events for folded
and never send what they changed. So a worker marks its state clean only
after a stop in which every write was acknowledged, and a worker that
starts without that mark discards its local state and recovers it from
the changelog, as a new worker would (Kafka Streams does the same under
exactly-once)."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from faust.stores import STORES
from faust.stores.rocksdb import Store as RocksDBStore

log = logging.getLogger("usertrail.stream")

SCHEME = "usertrail-rocksdb"
"""The store URL's scheme: ``usertrail-rocksdb://``."""

CLEAN = "clean-stop"
"""The file in a worker's faust directory saying its last stop was clean."""

# modest: eight partitions' databases share one process; faust's defaults
# (64 MiB write buffers, three of them, 2 GiB block cache) suit one table
# per machine
OPTIONS: dict[str, Any] = {
    "write_buffer_size": 8 * 1024 * 1024,
    "max_write_buffer_number": 2,
    "target_file_size_base": 8 * 1024 * 1024,
    "block_cache_size": 64 * 1024 * 1024,
    "block_cache_compressed_size": 0,
    "max_open_files": 256,
}

_partition: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "usertrail_partition", default=None
)


@contextlib.contextmanager
def on_partition(partition: int) -> Iterator[None]:
    """Reads and writes of the table inside belong to ``partition`` (with
    the memory store, where there is one dict, this changes nothing)."""
    token = _partition.set(partition)
    try:
        yield
    finally:
        _partition.reset(token)


class PartitionedRocksDB(RocksDBStore):
    """faust's RocksDB store, routed by ``on_partition`` where it is given."""

    def _set(self, key: bytes, value: bytes | None) -> None:
        partition = _partition.get()
        if partition is None:
            super()._set(key, value)
            return
        self._key_index[key] = partition
        self._db_for_partition(partition).put(key, value)

    def _get(self, key: bytes) -> bytes | None:
        partition = _partition.get()
        if partition is None:
            return super()._get(key)
        value: bytes | None = self._db_for_partition(partition).get(key)
        if value is not None:
            self._key_index[key] = partition
        return value

    def _del(self, key: bytes) -> None:
        partition = _partition.get()
        if partition is None:
            super()._del(key)
            return
        self._db_for_partition(partition).delete(key)


STORES.aliases[SCHEME] = f"{__name__}:PartitionedRocksDB"


def store_url(kind: str) -> str:
    return f"{SCHEME}://" if kind == "rocksdb" else "memory://"


def begin(datadir: Path) -> bool:
    """Called before the worker opens its state: keep the local state if
    the last stop was clean (True), else discard it. Either way the mark
    is removed: it is written again only by the next clean stop."""
    mark = datadir / CLEAN
    tables = datadir / "v1" / "tables"
    clean = mark.exists()
    mark.unlink(missing_ok=True)
    if not clean and tables.exists() and any(tables.iterdir()):
        log.warning(
            "the last stop of this worker was not clean: its local state may be ahead "
            "of the changelog; discarded, it is recovered from the changelog"
        )
        shutil.rmtree(tables)
    return clean


def end_clean(datadir: Path) -> None:
    """Every write of the stopped worker is acknowledged: its local state
    equals the changelog, the next start may use it."""
    (datadir / CLEAN).touch()

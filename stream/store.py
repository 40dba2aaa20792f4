"""The stream table's state on disk: faust's RocksDB store, told which
partition each read and write belongs to, and never ahead of the changelog.

Why not faust's ``rocksdb://`` as it is: its store keeps one database per
changelog partition and picks the partition of a read or write from the
event being processed (``current_event()``). The worker folds a batch of
many partitions at once (stream/folder.py), so that event is the batch's
last, and most users would be read from and written to another
partition's database. Here the folder names the partition
(``on_partition``), and only when it does not (a profile lookup, faust's own
recovery) does faust's logic apply.

Why never ahead: faust records, per partition, the changelog offset its
store holds data up to (the persisted offset), and a restarted worker reads
the changelog on from there. faust sets it as each changelog write is
acknowledged; the folder writes a batch to the store only once all of the
batch is acknowledged (stream/folder.py, ``unwritten``), so here the
persisted offset moves only with what the folder wrote
(``usertrail_persist``, never past a write not in the store yet:
``persistable``) or what recovery read. A worker killed at any moment
then restarts from its local state plus the changelog's tail.

Both stores, the memory one too (``FolderMemory``), take from the
changelog only what recovery reads for the partitions this worker folds
(``recovered_only``): from then on the folder alone writes them.

faust internals used here and nowhere else: the store's
``_db_for_partition``, ``_key_index``, ``set_persisted_offset`` and
``apply_changelog_batch``, and its recovery's ``active_tps`` and
``active_highwaters``; a faust upgrade that changes them fails
``tests/stream/test_store.py``."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from faust.stores import STORES
from faust.stores.memory import Store as MemoryStore
from faust.stores.rocksdb import Store as RocksDBStore
from faust.types import TP

SCHEME = "usertrail-rocksdb"
"""The store URL's scheme: ``usertrail-rocksdb://``."""

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


def recovered_only(store: Any, events: Iterable[Any]) -> list[Any]:
    """The changelog events faust may still apply to ``store``: all of a
    standby partition's, and of a partition this worker folds (active)
    only those up to the end its recovery read to. faust keeps applying
    what its changelog consumer delivers after that end (the rest of the
    last fetch, kept in a buffer until a later flush, such as the one at
    the next rebalance): on tansu, whose end offset stops at the first
    record of a partition's last batch (docs/brokers.md), the states after
    it in that batch; on any broker, what a worker that just lost the
    partition wrote after the end was read. Applied late, such a state
    would overwrite the newer one the folder stored meanwhile, and the
    user's next batch would be folded onto it, losing what the folder had
    added. Left out, it is what recovery did not read: a state past the
    newest applied offset, folded again from that offset (stream/folder.py)."""
    recovery = store.app.tables.recovery
    active, ends = recovery.active_tps, recovery.active_highwaters
    kept = []
    for event in events:
        tp = event.message.tp
        if tp in active:
            end = ends.get(tp)  # the last offset recovery reads
            if end is not None and event.message.offset > end:
                store.usertrail_left_out += 1
                continue
        kept.append(event)
    return kept


class FolderMemory(MemoryStore[bytes, bytes]):
    """faust's memory store, taking from the changelog only what recovery
    reads for the partitions this worker folds (``recovered_only``)."""

    usertrail_left_out = 0
    """Changelog records past recovery's end not applied (``recovered_only``)."""

    def apply_changelog_batch(self, batch: Any, to_key: Any, to_value: Any) -> None:
        super().apply_changelog_batch(recovered_only(self, batch), to_key, to_value)


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

    # --- the persisted offsets ------------------------------------------------
    _recovering = False
    usertrail_recovered = 0
    """Changelog records read into the store since the worker started."""

    usertrail_left_out = 0
    """Changelog records past recovery's end not applied (``recovered_only``)."""

    def apply_changelog_batch(self, batch: Any, to_key: Any, to_value: Any) -> None:
        events = recovered_only(self, batch)
        self._recovering = True
        try:
            super().apply_changelog_batch(events, to_key, to_value)
        finally:
            self._recovering = False
        self.usertrail_recovered += len(events)

    def set_persisted_offset(self, tp: Any, offset: int) -> None:
        if self._recovering:  # what recovery just wrote
            super().set_persisted_offset(tp, offset)
        # else faust's acknowledgement of one changelog write: the folder has
        # not written it to the store yet (usertrail_persist)

    def usertrail_persist(self, partition: int, offset: int) -> None:
        """The folder wrote the store up to this changelog offset."""
        super().set_persisted_offset(
            TP(self.table.changelog_topic.get_topic_name(), partition), offset
        )

    def _del(self, key: bytes) -> None:
        partition = _partition.get()
        if partition is None:
            super()._del(key)
            return
        self._db_for_partition(partition).delete(key)


def acknowledged(sent: Iterable[Any]) -> Iterator[tuple[int, int]]:
    """(changelog partition, offset) of each send the broker acknowledged."""
    for future in sent:
        if future.done() and not future.cancelled() and future.exception() is None:
            meta = future.result()
            yield meta.topic_partition.partition, meta.offset


def persistable(newest: Mapping[int, int], unstored: Iterable[tuple[int, int]]) -> dict[int, int]:
    """Per changelog partition, the offset the store now holds data up to:
    the newest write in the store (``newest``), but below the oldest write
    of a later batch acknowledged and not in the store yet (``unstored``,
    (partition, offset) pairs). A later batch's states can lie before an
    earlier batch's applied offsets (sent only once that batch's states
    were acknowledged); recovery, reading on from the persisted offset,
    must not skip them while it reads the applied offsets that follow
    them, or a restarted worker holds a later batch's applied offsets over
    the earlier batch's states. (States it reads again without their
    applied offset are folded once more from the older one, and come out
    the same.)"""
    out = dict(newest)
    for partition, offset in unstored:
        if partition in out and offset <= out[partition]:
            out[partition] = offset - 1
    return {p: offset for p, offset in out.items() if offset >= 0}


MEMORY = "usertrail-memory"
"""The memory store's URL scheme: ``usertrail-memory://``."""
STORES.aliases[SCHEME] = f"{__name__}:PartitionedRocksDB"
STORES.aliases[MEMORY] = f"{__name__}:FolderMemory"


def store_url(kind: str) -> str:
    return f"{SCHEME}://" if kind == "rocksdb" else f"{MEMORY}://"

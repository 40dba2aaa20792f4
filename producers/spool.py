"""The local spool: events the broker did not acknowledge in time.

One JSON object a line: ``{"topic": ..., "key": ..., "value": ...}`` with the
exact wire text of the event. A client appends here when a delivery fails and
re-sends the file at its next start, so nothing accepted by ``track_*`` is
lost. A re-sent event may reach the topic twice if the broker had in fact
stored it; every consumer deduplicates by event id (docs/architecture.md, rule 2).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple


class SpooledRecord(NamedTuple):
    """One event on its way: a tuple, since the SDK makes one per event."""

    topic: str
    key: bytes
    value: bytes


class Spool:
    def __init__(self, path: Path) -> None:
        self.path = path

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def append(self, records: list[SpooledRecord]) -> None:
        if not records:
            return
        lines = "".join(
            json.dumps(
                {"topic": r.topic, "key": r.key.decode(), "value": r.value.decode()},
                ensure_ascii=False,
            )
            + "\n"
            for r in records
        )
        with self._locked(), open(self.path, "a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

    def take(self) -> list[SpooledRecord]:
        """Remove and return everything spooled (the caller re-sends it and
        appends back whatever fails again)."""
        with self._locked():
            if not self.path.exists():
                return []
            text = self.path.read_text(encoding="utf-8")
            records = []
            for line in text.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                records.append(
                    SpooledRecord(item["topic"], item["key"].encode(), item["value"].encode())
                )
            self.path.unlink()
            return records

    def count(self) -> int:
        if not self.path.exists():
            return 0
        with open(self.path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())

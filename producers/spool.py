"""The local spool: events the broker did not acknowledge in time.

One JSON object a line: ``{"topic": ..., "key": ..., "value": ...,
"headers": [[name, value], ...]}`` with the exact wire text of the event
(files written before headers existed have none). A client appends here when a delivery fails and
re-sends the file at its next start, so nothing accepted by ``track_*`` is
lost. A re-sent event may reach the topic twice if the broker had in fact
stored it; every consumer deduplicates by event id (docs/architecture.md, rule 2).

Portable: the file is locked with ``fcntl`` on POSIX and ``msvcrt`` on
Windows, and nothing (no lock file either) is created until an event is
spooled.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, NamedTuple

if sys.platform == "win32":
    import msvcrt

    def _lock(f: IO[str]) -> None:
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)

    def _unlock(f: IO[str]) -> None:
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _lock(f: IO[str]) -> None:
        fcntl.flock(f, fcntl.LOCK_EX)

    def _unlock(f: IO[str]) -> None:
        fcntl.flock(f, fcntl.LOCK_UN)


def default_directory() -> Path:
    """Where spools live unless told: the user's data directory, absolute,
    so an app started from any working directory finds what it spooled
    (``%LOCALAPPDATA%\\usertrail\\spool`` on Windows,
    ``~/Library/Application Support/usertrail/spool`` on macOS,
    ``$XDG_DATA_HOME/usertrail/spool`` or ``~/.local/share/usertrail/spool``
    elsewhere)."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        xdg = os.environ.get("XDG_DATA_HOME")
        base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return (base / "usertrail" / "spool").absolute()


class SpooledRecord(NamedTuple):
    """One event on its way: a tuple, since the SDK makes one per event."""

    topic: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()  # Kafka headers, kept through the spool


class Spool:
    def __init__(self, path: Path) -> None:
        self.path = path.absolute()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            _lock(lock)
            try:
                yield
            finally:
                _unlock(lock)

    def append(self, records: list[SpooledRecord]) -> None:
        if not records:
            return
        lines = "".join(
            json.dumps(
                {
                    "topic": r.topic,
                    "key": r.key.decode(),
                    "value": r.value.decode(),
                    "headers": [[name, value.decode()] for name, value in r.headers],
                },
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
        if not self.path.exists():
            return []  # nothing spooled: no directory or lock file made
        with self._locked():
            if not self.path.exists():
                return []  # another process took it meanwhile
            text = self.path.read_text(encoding="utf-8")
            records = []
            for line in text.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                records.append(
                    SpooledRecord(
                        item["topic"],
                        item["key"].encode(),
                        item["value"].encode(),
                        tuple((n, v.encode()) for n, v in item.get("headers", ())),
                    )
                )
            self.path.unlink()
            return records

    def count(self) -> int:
        if not self.path.exists():
            return 0
        with open(self.path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())

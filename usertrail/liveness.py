"""Is a worker group live? ``replay`` must not race the workers it rebuilds for.

Apache Kafka drops a member whose heartbeats stop, so a group's description
answers. tansu keeps every member it ever had (even after LeaveGroup) and
describes them without metadata, so on the embedded broker -- one machine by
design -- each worker process holds an exclusive lock on a file of its own
in the data directory for its whole life (the kernel releases it on SIGKILL
too), and a lock that can be taken is a worker that is gone.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from usertrail.errors import UsertrailError
from usertrail.settings import Settings


class WorkersRunning(UsertrailError):
    """The worker group has live members: a replay would race them."""


@dataclass(frozen=True)
class Member:
    member_id: str
    client_host: str


async def group_members(settings: Settings, group: str) -> list[Member]:
    admin = AIOKafkaAdminClient(**settings.kafka_options(), request_timeout_ms=15000)
    await admin.start()
    try:
        # A young cluster answers "coordinator not available" until it has
        # made its offsets topic; aiokafka's admin client does not retry it.
        for attempt in range(60):
            try:
                responses = await admin.describe_consumer_groups([group])
                break
            except KafkaError as exc:
                if not exc.retriable or attempt == 59:
                    raise
                await asyncio.sleep(0.5)
    finally:
        await admin.close()
    members = []
    for response in responses:
        for described in response.groups:
            # (error_code, group_id, state, protocol_type, protocol, members, ...)
            for member_id, _client_id, client_host, *_ in described[5]:
                members.append(Member(member_id, client_host))
    return members


def _lock_dir(settings: Settings, group: str) -> Path:
    return settings.data_dir / "workers" / group


def hold_worker_lock(settings: Settings, group: str) -> IO[str]:
    """Called by each worker process of ``group``: its own lock file, locked
    until the process ends. Returns the open file; keep it."""
    directory = _lock_dir(settings, group)
    directory.mkdir(parents=True, exist_ok=True)
    # the host too: containers sharing a data volume each run as pid 1
    name = f"{os.getpid()}@{socket.gethostname()}.lock"
    handle = open(directory / name, "w")  # noqa: SIM115 - held for life
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


def local_workers(settings: Settings, group: str) -> list[str]:
    """Worker processes of ``group`` on this machine (sharing its data
    directory) that are alive; stale lock files are removed."""
    live = []
    directory = _lock_dir(settings, group)
    for path in sorted(directory.glob("*.lock")) if directory.is_dir() else []:
        with open(path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                live.append(f"pid {path.stem}")
                continue
        path.unlink(missing_ok=True)
    return live


async def live_workers(settings: Settings, group: str) -> list[str]:
    found = local_workers(settings, group)
    if not settings.is_tansu:
        members = await group_members(settings, group)
        if len(members) > len(found):
            found += [m.client_host or m.member_id for m in members[len(found) :]]
    return found


async def refuse_if_live(settings: Settings, group: str, what: str, command: str) -> None:
    workers = await live_workers(settings, group)
    if workers:
        raise WorkersRunning(
            f"{len(workers)} {what} worker(s) of group {group!r} are running "
            f"({', '.join(workers)}); stop them ({command} / usertrail up) before replaying, "
            "then start them again: they carry on after the replayed point"
        )

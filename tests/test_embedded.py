"""The embedded stack's set-up, where processes meet: the system user that
PostgreSQL runs as when we are root."""

from __future__ import annotations

import multiprocessing
import os
import pwd
import subprocess
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from usertrail.embedded import system_user
from usertrail.errors import EmbeddedStackError


def _uid_at(name: str, start_at: float) -> int | str:
    time.sleep(max(0.0, start_at - time.time()))  # every process at once
    try:
        return system_user(name).pw_uid
    except EmbeddedStackError as e:
        return str(e)


def test_processes_starting_postgresql_at_once_make_its_user_once() -> None:
    """The suite's workers, or two `up`s, each start an embedded PostgreSQL
    at the same moment: one system user comes of it, under one id, and
    every process gets that id (useradd alone made the user twice here)."""
    name = f"ut_{uuid.uuid4().hex[:10]}"
    start_at = time.time() + 1.0
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("fork")) as pool:
        got = list(pool.map(_uid_at, [name] * 4, [start_at] * 4))
    try:
        if os.geteuid() != 0:  # useradd needs root: a clear error, in every process
            assert all(isinstance(g, str) and name in g for g in got), got
            return
        passwd = Path("/etc/passwd").read_text().splitlines()
        entries = [line for line in passwd if line.startswith(f"{name}:")]
        assert len(entries) == 1, entries
        assert got == [pwd.getpwnam(name).pw_uid] * 4, got
    finally:
        if os.geteuid() == 0:
            subprocess.run(["userdel", name], capture_output=True)
            subprocess.run(["groupdel", name], capture_output=True)

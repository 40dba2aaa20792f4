"""An app's tracking tested without a broker: a disabled client, and the
recording clients of ``usertrail.producers.testing``; and where the SDK
keeps its spool (absolute, nothing made until something is spooled)."""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import pytest
from usertrail.producers import SyncTrackingClient, TrackingClient, decode
from usertrail.producers.spool import Spool, SpooledRecord, default_directory
from usertrail.producers.testing import RecordingClient, SyncRecordingClient

from usertrail.errors import ClientClosedError, EventValidationError
from usertrail.settings import Settings

NOWHERE = Settings(kafka_bootstrap_servers="127.0.0.1:9", broker="kafka")  # nothing listens


async def test_a_disabled_client_validates_and_sends_nothing(tmp_path: Path) -> None:
    client = TrackingClient(
        source="web", settings=NOWHERE, disabled=True, spool_path=tmp_path / "s"
    )
    with pytest.raises(ClientClosedError):
        await client.track_interaction(user_id="u", type="chat", service="tarot")
    async with client:
        event_id = await client.track_interaction(user_id="u", type="chat", service="tarot")
        assert len(event_id) == 36
        with pytest.raises(EventValidationError, match="rating"):
            await client.track_interaction(user_id="u", type="chat", service="tarot", rating=9)
        assert (await client.flush()).delivered == 0
    assert not (tmp_path / "s").exists() and not os.listdir(tmp_path)


async def test_the_recording_client_keeps_what_would_have_been_sent() -> None:
    async with RecordingClient(source="web", settings=NOWHERE) as client:
        first = await client.track_interaction(
            user_id="user-42", type="reading", service="saju", rating=5
        )
        await client.erase_user(user_id="user-43")
        with pytest.raises(EventValidationError):
            await client.track_onboarding(user_id="", interests=["love"])
    assert [e.kind for e in client.events] == ["interaction", "user.erased"]
    assert client.events[0].event_id == first and client.events[0].source == "web"
    assert client.records[0].key == b"user-42"
    assert dict(client.records[0].headers)["content-type"] == b"application/json"
    client.clear()
    assert client.events == []


def test_the_sync_recording_client_too() -> None:
    with SyncRecordingClient(source="backend", settings=NOWHERE) as client:
        client.track_onboarding(user_id="u", interests=["career"], experience="new")
    assert [(e.kind, e.user_id) for e in client.events] == [("onboarding.completed", "u")]


def test_the_spool_is_absolute_and_made_only_when_something_is_spooled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("USERTRAIL_SPOOL_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_directory() == tmp_path / "xdg" / "usertrail" / "spool"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")  # the XDG spec: absolute only
    assert default_directory().is_absolute()
    client = TrackingClient(source="web", settings=Settings())
    assert client.spool.path.is_absolute()
    monkeypatch.chdir(tmp_path)
    spool = Spool(Path("rel") / "web.jsonl")
    assert spool.path == tmp_path / "rel" / "web.jsonl"  # fixed where it was made
    assert spool.take() == [] and not (tmp_path / "rel").exists()  # no lock file either
    spool.append([SpooledRecord("t", b"k", b"{}")])
    assert spool.count() == 1


def test_the_default_spool_directory_on_macos_and_windows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each platform's user data directory, absolute; Windows' without
    LOCALAPPDATA falls back to the one under the home directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))  # not looked at on either
    monkeypatch.setattr(sys, "platform", "darwin")
    mac = tmp_path / "home" / "Library" / "Application Support" / "usertrail" / "spool"
    assert default_directory() == mac
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "Local"))
    assert default_directory() == tmp_path / "Local" / "usertrail" / "spool"
    monkeypatch.delenv("LOCALAPPDATA")
    windows = tmp_path / "home" / "AppData" / "Local" / "usertrail" / "spool"
    assert default_directory() == windows
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOCALAPPDATA", "relative")
    assert default_directory() == tmp_path / "relative" / "usertrail" / "spool"


async def test_a_client_spools_under_usertrail_spool_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """USERTRAIL_SPOOL_DIR (Settings.spool_dir) is where a client spools,
    one file per source, made when something is spooled, and nothing goes
    to the user's data directory."""
    monkeypatch.setenv("USERTRAIL_SPOOL_DIR", str(tmp_path / "spools"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    settings = Settings(kafka_bootstrap_servers="127.0.0.1:9", broker="kafka")  # nothing listens
    assert settings.spool_dir == tmp_path / "spools"
    client = TrackingClient(source="web", settings=settings)
    assert client.spool.path == tmp_path / "spools" / "web.jsonl"
    async with client:  # offline start: accepted, held, spooled at close
        event_id = await client.track_interaction(user_id="u", type="chat", service="tarot")
        assert not (tmp_path / "spools").exists()
    assert [decode(r.value).event_id for r in Spool(client.spool.path).take()] == [event_id]
    assert not (tmp_path / "xdg").exists()
    sync = SyncTrackingClient(source="backend", settings=settings)
    try:
        assert sync.spool.path == tmp_path / "spools" / "backend.jsonl"
    finally:
        sync.close()


POSIX_ONLY = {"fcntl", "termios", "pwd", "grp", "resource", "posix", "tty", "pty"}
SDK_FILES = [
    "producers/__init__.py",
    "producers/client.py",
    "producers/events.py",
    "producers/headers.py",
    "producers/ids.py",
    "producers/profiles.py",
    "producers/spool.py",
    "producers/testing.py",
    "usertrail/__init__.py",
    "usertrail/errors.py",
    "usertrail/kafka.py",
    "usertrail/settings.py",
]


def test_the_sdk_imports_nothing_posix_only_outside_a_platform_branch() -> None:
    """The SDK runs on Windows too: a POSIX-only module is imported only in
    the branch of an ``if sys.platform ...`` whose other branch serves
    Windows."""
    root = Path(__file__).parents[2]
    found = []
    for name in SDK_FILES:
        tree = ast.parse((root / name).read_text())
        guarded: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "sys.platform" in ast.unparse(node.test):
                assert node.orelse, f"{name}: a platform branch with no other side"
                for inner in ast.walk(node):
                    guarded.add(id(inner))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in guarded:
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
                found += [(name, n) for n in names if n.partition(".")[0] in POSIX_ONLY]
    assert found == []

"""The TypeScript client (sdk-js/): built with npm and tested with Node's own
test runner against a collector process on each broker (tansu, Apache Kafka); every event the
collector accepted from it is then read back from the events topic. The
types it is built from are the contract's JSON Schemas, and those must be
the ones the contract exports today."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from usertrail.producers import decode
from usertrail.producers.events import json_schemas

from tests.conftest import Broker, read_all
from tests.test_collector import CollectorProcess, collector_factory, new_key
from usertrail.settings import Settings
from usertrail.topics import ensure_topics

__all__ = ["collector_factory"]  # the fixture, used here

SDK_JS = Path(__file__).resolve().parent.parent / "sdk-js"


def test_schema_files_are_the_contract_of_today() -> None:
    """`usertrail schema --out sdk-js/schema` after a contract change."""
    for kind, schema in json_schemas().items():
        path = SDK_JS / "schema" / f"{kind}.schema.json"
        assert json.loads(path.read_text()) == schema, f"{path} is stale"


def _npm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    npm = shutil.which("npm")
    assert npm is not None, "the tests need Node.js 18+ with npm (README, Tests)"
    return subprocess.run(
        [npm, *args], cwd=SDK_JS, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.xdist_group("sdk-js")  # one npm ci at a time in sdk-js/
def test_typescript_client_against_a_running_collector(
    broker: Broker,
    settings_factory: Callable[..., Settings],
    database_url: str,
    collector_factory: Callable[..., CollectorProcess],
    tmp_path: Path,
) -> None:
    settings = settings_factory(broker)
    asyncio.run(ensure_topics(settings))
    key = new_key(settings, database_url, "js-app")["key"]
    collector = collector_factory(settings, database_url)
    for step in (("ci", "--no-audit", "--no-fund"), ("run", "build")):
        done = _npm(*step)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "accepted.txt"
    env = {
        **os.environ,
        "USERTRAIL_COLLECTOR_URL": collector.url,
        "USERTRAIL_COLLECTOR_KEY": key,
        "USERTRAIL_SDK_JS_OUT": str(out),
    }
    done = _npm("test", env=env)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    counts = dict(re.findall(r"^# (tests|pass|fail) (\d+)$", done.stdout, re.MULTILINE))
    # every test file ran (the collector ones need this test's collector)
    assert counts.get("fail") == "0" and counts.get("pass") == counts.get("tests"), counts
    assert int(counts["tests"]) >= 12, done.stdout[-3000:]
    assert collector.stop() == 0
    accepted = out.read_text().split()
    assert len(accepted) == 251 + 1 + 100
    records = asyncio.run(read_all(settings, settings.events_topic, expected=len(accepted)))
    events = [decode(v or b"") for _, _, v in records]
    assert sorted(e.event_id for e in events) == sorted(accepted)
    assert {e.source for e in events} == {"js-app"}

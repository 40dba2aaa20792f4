"""``usertrail analytics``: a table for people, JSON for machines, one line
and exit code 2 for a bad argument; and the dashboard's API refusals."""

from __future__ import annotations

import json

import pytest
from aiohttp.test_utils import TestClient, TestServer
from usertrail.analytics.api import Pool, build_app

from tests.analytics.rows import fill
from usertrail.cli import main


def test_reports_as_tables_and_json(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    fill(database_url)
    db = ["--database-url", database_url]
    assert main(["analytics", "services", *db]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["service", "interactions", "users", "ratings", "avg", "rating"]
    assert lines[1].split() == ["tarot", "2", "1", "1", "5.00"]
    assert main(["analytics", "services", "--json", *db]) == 0
    assert json.loads(capsys.readouterr().out)[1] == {
        "service": "saju",
        "interactions": 1,
        "users": 1,
        "ratings": 1,
        "averageRating": 2.0,
    }
    # 23:50 UTC on April 30 is May 1 in Seoul
    week = ["--since", "2026-04-30", "--days", "3", "--json"]
    assert main(["analytics", "engagement", *week, "--tz", "Asia/Seoul", *db]) == 0
    days = json.loads(capsys.readouterr().out)["days"]
    assert [(d["day"], d["total"]) for d in days] == [
        ("2026-04-30", 0),
        ("2026-05-01", 2),
        ("2026-05-02", 1),
    ]
    assert main(["analytics", "engagement", *week, *db]) == 0
    days = json.loads(capsys.readouterr().out)["days"]
    assert [d["total"] for d in days] == [1, 1, 1]
    assert main(["analytics", "segments", *db]) == 0
    out = capsys.readouterr().out
    assert "1 of 2 users have a segment (50.00%)" in out and "seeker" in out
    assert main(["analytics", "themes", "--json", *db]) == 0
    assert [t["theme"] for t in json.loads(capsys.readouterr().out)] == ["career", "love"]


@pytest.mark.parametrize(
    "args",
    [
        ["engagement", "--tz", "Mars/Olympus"],
        ["engagement", "--since", "2026-05-03", "--until", "2026-05-01"],
    ],
)
def test_a_bad_argument_is_one_line_and_exit_code_2(
    database_url: str, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    assert main(["analytics", *args, "--database-url", database_url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usertrail: error: ") and len(err.splitlines()) == 1


@pytest.mark.parametrize("args", [["--days", "0"], ["--since", "May 1"]])
def test_a_malformed_option_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["analytics", "engagement", *args])
    assert exited.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


async def test_the_api_answers_errors_in_json(database_url: str) -> None:
    fill(database_url)
    pool = Pool(database_url)
    async with TestClient(TestServer(build_app(pool, "UTC"))) as client:
        for path, status in [
            ("/api/v1/engagement?days=0", 400),
            ("/api/v1/engagement?days=x", 400),
            ("/api/v1/engagement?tz=Nowhere", 400),
            ("/api/v1/engagement?since=2026-13-01", 400),
            ("/api/v1/users/nobody", 404),
        ]:
            response = await client.get(path)
            assert response.status == status, path
            assert set((await response.json())["error"]) == {"code", "message"}
        user = await (await client.get("/api/v1/users/a")).json()
        assert user["profile"]["segments"][0]["reasons"] == ["2 of 2 were tarot"]
        assert user["services"] == [{"service": "tarot", "interactions": 2}]
        document = await (await client.get("/openapi.json")).json()
        assert set(document["paths"]) == {
            f"/api/v1/{n}" for n in ("services", "ratings", "engagement", "themes", "segments")
        } | {"/api/v1/users/{user_id}"}
        assert (await client.get("/")).status == 200
        assert (await client.get("/static/dashboard.js")).status == 200
    await pool.close()

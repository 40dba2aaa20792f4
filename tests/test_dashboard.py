"""The dashboard in a real browser (Debian's headless chromium, driven with
Selenium through the machine's chromedriver), against a running pipeline:
the SDK sends, the sink and the stream write, ``usertrail dashboard``
serves. The charts show the numbers the API gives, follow new traffic by
themselves, a user is looked up, nothing is requested from outside the
server, and a screenshot is kept (``.artifacts/dashboard.png``, or
``$USERTRAIL_ARTIFACTS``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from usertrail.producers import TrackingClient

from tests.conftest import Broker, create_topics, unique
from tests.sink.conftest import query
from tests.workers import count_rows, sink_process, stream_process, wait_for
from usertrail.embedded import free_port
from usertrail.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("USERTRAIL_ARTIFACTS", ROOT / ".artifacts"))
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--window-size=1280,1400",
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def api(base: str, path: str) -> Any:
    with urllib.request.urlopen(base + path, timeout=10) as response:
        return json.loads(response.read())


def drawn(driver: webdriver.Chrome, selector: str) -> dict[str, float]:
    """The figures a chart draws, read at once (the page redraws every second)."""
    pairs = driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]))"
        ".map(e => [e.dataset.key, e.dataset.value])",
        selector,
    )
    return {key: float(value) for key, value in pairs}


async def send(settings: Settings, n: int, start: int, service: str | None = None) -> None:
    now = datetime.now(UTC)
    async with TrackingClient(source="web", settings=settings) as client:
        for i in range(start, start + n):
            await client.track_interaction(
                user_id=f"user-{i % 30}",
                type=["reading", "chat", "feedback", "share"][i % 4],
                service=service or ["saju", "tarot", "astrology"][i % 3],
                theme=[None, "love", "career", "health"][i % 4],
                rating=[None, 3, 4, 5, 2][i % 5],
                occurred_at=now - timedelta(hours=(i * 7) % 96),
            )


@pytest.mark.parametrize("broker", ["tansu"], indirect=True)
@pytest.mark.xdist_group("browser")
async def test_the_dashboard_draws_what_the_api_says_and_follows_traffic(
    broker: Broker,
    settings_factory: Callable[..., Settings],
    database_url: str,
    browser: webdriver.Chrome,
    tmp_path: Path,
) -> None:
    settings = settings_factory(broker, stream_app_id=unique("dash"))
    await create_topics(settings)
    sink = sink_process(settings, database_url, tmp_path / "sink.log", unique("sink"))
    stream = stream_process(settings, free_port(), tmp_path / "stream.log")
    port = free_port()
    dashboard = dashboard_process(database_url, port, tmp_path / "dashboard.log")
    base = f"http://127.0.0.1:{port}"
    try:
        await send(settings, 300, 0)
        await wait_for(lambda: count_rows(database_url) >= 300, 90, "the rows")
        await wait_for(
            lambda: query(database_url, "SELECT count(*) FROM user_vectors")[0][0] >= 30,
            90,
            "every user's profile in user_vectors",
        )
        await wait_for(lambda: _up(base), 30, "the dashboard")

        browser.get(base + "/?refresh=1&days=7")
        refreshed = WebDriverWait(browser, 30).until(
            lambda d: int(d.find_element(By.ID, "status").get_attribute("data-refreshed") or 0)
        )
        assert refreshed >= 1
        services = api(base, "/api/v1/services")
        assert sum(s["interactions"] for s in services) == 300
        assert drawn(browser, "#services-chart rect.bar") == {
            s["service"]: s["interactions"] for s in services
        }
        assert drawn(browser, "#ratings-chart rect.bar") == {
            r["service"]: r["averageRating"] for r in api(base, "/api/v1/ratings")
        }
        assert drawn(browser, "#themes-chart rect.bar") == {
            t["theme"]: t["interactions"] for t in api(base, "/api/v1/themes")
        }
        segments = api(base, "/api/v1/segments")
        assert segments["total"] == 30
        assert drawn(browser, "#segments-chart rect.bar") == {
            d["segment"]: d["count"] for d in segments["distribution"]
        }
        coverage = browser.find_element(By.ID, "segments-coverage")
        assert coverage.get_attribute("data-with-segments") == str(segments["withSegments"])
        engagement = api(base, "/api/v1/engagement?days=7")
        assert len(engagement["days"]) == 7
        assert drawn(browser, "#engagement-chart g.day") == {
            d["day"]: d["total"] for d in engagement["days"]
        }
        assert sum(d["total"] for d in engagement["days"]) == 300  # all within 4 days

        # more traffic: the page follows by itself
        await send(settings, 60, 300, service="tarot")
        await wait_for(lambda: count_rows(database_url) >= 360, 90, "the new rows")
        tarot = next(s for s in api(base, "/api/v1/services") if s["service"] == "tarot")
        assert tarot["interactions"] == 160
        WebDriverWait(browser, 30).until(
            lambda d: drawn(d, "#services-chart rect.bar").get("tarot") == 160
        )

        # a user lookup
        user = api(base, "/api/v1/users/user-7")
        browser.find_element(By.ID, "lookup-id").send_keys("user-7")
        browser.find_element(By.ID, "lookup-go").click()
        WebDriverWait(browser, 30).until(
            lambda d: d.find_element(By.ID, "lookup-result").get_attribute("data-user") == "user-7"
        )
        primary = browser.find_element(By.ID, "lookup-primary").text
        assert user["profile"]["primarySegment"] in primary
        rows = browser.find_elements(By.CSS_SELECTOR, "#lookup-services tr")
        shown = [r.text.split() for r in rows[1:]]
        assert shown == [[s["service"], str(s["interactions"])] for s in user["services"]]
        reasons = browser.find_element(By.ID, "lookup-segments").text
        for s in user["profile"]["segments"]:
            assert s["reasons"][0] in reasons

        # everything the page loaded came from the server itself
        resources = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        assert resources and all(r.startswith(base + "/") for r in resources), resources

        shot = screenshot(browser)
        assert shot.stat().st_size > 10_000
        print(f"\nscreenshot: {shot}")
    finally:
        for proc in (dashboard, stream, sink):
            proc.send_signal(signal.SIGTERM)
        for proc in (dashboard, stream, sink):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert dashboard.returncode == 0, (tmp_path / "dashboard.log").read_text()


def dashboard_process(url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DATABASE_URL": url, "USERTRAIL_ANALYTICS_TIMEZONE": "UTC"}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "usertrail.cli", "dashboard", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def screenshot(browser: webdriver.Chrome) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    return shot


def _up(base: str) -> bool:
    try:
        return api(base, "/health") == {"status": "ok"}
    except OSError:
        time.sleep(0.2)
        return False

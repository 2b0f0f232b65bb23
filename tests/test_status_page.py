"""The status page (issue 20): what it shows, who may see it, and a real browser using it.

The browser is Debian's Chromium driven by Selenium (the README's set-up installs
`chromium` and `chromium-driver`); its calls block, so they run in a thread while the
daemon runs on the test's loop.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import GatedEngine, daemon_running, make_settings
from tests.docgen import make_tiff
from watcher.core.outcome import Outcome, Report
from watcher.core.progress import BIN_SECONDS, BINS, Bins, Progress
from watcher.core.refs import ObjectRef
from watcher.service import page
from watcher.service.hooks import RecentWork

TOKEN = "page-token-7c1e"


def ref(key: str, etag: str = "e1") -> ObjectRef:
    return ObjectRef("b", key, etag, 10)


# --- the parts, without a daemon ----------------------------------------------------------
def test_progress_counts_pages_of_the_document_being_read() -> None:
    progress = Progress()
    with progress.reading(ref("input/a.pdf")) as entry:
        assert progress.snapshot(5)[0]["pages_total"] is None  # not decoded yet
        entry.pages(500, done=120)  # 120 kept from an earlier attempt
        entry.page_done()
        assert progress.pages() == (121, 500)
        [shown] = progress.snapshot(5)
        assert (shown["key"], shown["pages_done"], shown["pages_total"]) == ("input/a.pdf", 121, 500)
    assert len(progress) == 0 and progress.pages() == (0, 0)
    assert sum(count for _start, count in progress.pages_read.series()) == 1  # only pages read now


def test_bins_count_per_bin_and_forget_what_left_the_window() -> None:
    now = [1_000_000.0]
    bins = Bins(lambda: now[0])
    bins.add(3)
    bins.add()
    series = bins.series()
    assert len(series) == BINS and series[-1][1] == 4 and sum(c for _s, c in series) == 4
    now[0] += BIN_SECONDS * BINS
    bins.add()
    assert [c for _s, c in bins.series() if c] == [1]


def test_recent_work_lists_finished_runs_newest_first_bounded() -> None:
    recent = RecentWork(limit=2)
    recent.ended(Report(ref("input/a"), Outcome.DONE, pages=3))
    recent.ended(Report(ref("input/b"), Outcome.HELD))  # comes back: not listed
    recent.ended(Report(ref("input/c"), Outcome.ERROR, code="unsupported_format"))
    recent.ended(Report(ref("input/d"), Outcome.RETRY))
    assert [f.report.ref.key for f in recent.last] == ["input/c", "input/a"]
    recent.ended(Report(ref("input/e"), Outcome.DONE, pages=1))
    assert [f.report.ref.key for f in recent.last] == ["input/e", "input/c"]
    assert sum(c for _s, c in recent.finished.series()) == 3


def health_of(key: str, done: int, total: int | None) -> dict[str, Any]:
    return {
        "status": "healthy", "draining": False, "version": "0", "uptime_seconds": 5,
        "backlog_documents": 4, "s3": {"bucket": "b", "reachable": True},
        "engine": {"name": "cpu", "model": "t", "state": "ready", "error": None, "unavailable": None,
                   "vlm_requests": {"limit": 8, "inflight": 6, "upper_bound": 64, "mode": "metrics",
                                    "server_running": 6, "server_waiting": 1}},
        "in_progress": {"documents": 1, "pages_done": done, "pages_total": total or 0,
                        "shown": [{"key": key, "etag": "e", "pages_done": done, "pages_total": total,
                                   "seconds": 75}]},
    }


def test_live_fragment_escapes_names_and_shows_progress_and_vlm_use() -> None:
    hostile = "input/<script>alert(1)</script>.pdf"
    recent = RecentWork()
    recent.ended(Report(ref(hostile), Outcome.DONE, pages=2, output='output/<b>"x".json'))
    html = page.live(health_of(hostile, 120, 500), recent, Bins(), "/results/")
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert '<progress value="120" max="500"></progress> 120 / 500' in html
    assert "75%" in html and "6 running, 1 waiting" in html  # in flight / limit; the server's queue
    assert 'href="/results/output/%3Cb%3E%22x%22.json"' in html


# --- over HTTP, with a daemon ---------------------------------------------------------------
async def get(url: str, token: str | None = None) -> tuple[int, str, dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        return resp.status, await resp.text(), dict(resp.headers)


@pytest.mark.e2e
async def test_page_is_off_unless_asked_for(weed: Any, bucket: str) -> None:
    async with daemon_running(make_settings(weed, bucket)) as daemon:
        status, _body, _ = await get(f"http://127.0.0.1:{daemon.http.port}/")
        assert status == 404


@pytest.mark.e2e
async def test_with_a_token_the_page_refuses_requests_without_it(weed: Any, bucket: str, s3: Any) -> None:
    key = "input/секретный договор.tiff"
    s3.put_object(Bucket=bucket, Key=key, Body=make_tiff([["Договор 1"]]))
    settings = make_settings(weed, bucket, status_page=True, webhook_token=TOKEN)
    async with daemon_running(settings) as daemon:
        base = f"http://127.0.0.1:{daemon.http.port}"
        daemon.poke()
        async with asyncio.timeout(60):
            while not daemon.recent.last:
                await asyncio.sleep(0.1)
        output = daemon.recent.last[0].report.output
        assert output is not None
        for path in ("/", "/status/live", f"/results/{output}"):
            for wrong in (None, "not-the-token"):
                status, body, _ = await get(base + path, wrong)
                assert status == 401, path
                assert "секретный" not in body and "%D1%81" not in body
        status, body, headers = await get(base + "/", TOKEN)
        assert status == 200 and "секретный договор.tiff" in body
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        status, body, _ = await get(f"{base}/results/{output}", TOKEN)
        assert status == 200 and json.loads(body)["source"]["key"] == key
        # Only the output prefix is readable through the page, even with the token.
        status, _body, _ = await get(f"{base}/results/{key}", TOKEN)
        assert status == 404


# --- in a real browser ----------------------------------------------------------------------
@pytest.fixture
def browser() -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "install Debian's chromium and chromium-driver (the README's set-up)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


async def until(browser: WebDriver, check: Callable[[WebDriver], bool], timeout: float = 60) -> None:
    # The page swaps its live part every few seconds: an element read mid-swap is stale.
    wait = WebDriverWait(browser, timeout, poll_frequency=0.2,
                         ignored_exceptions=(StaleElementReferenceException,))
    await asyncio.to_thread(wait.until, check)


def finished_row(browser: WebDriver, key: str) -> tuple[str, str] | None:
    """The text and result link of `key`'s row among the finished, read in one step."""
    found = browser.execute_script(
        "const row = [...document.querySelectorAll('#recent tr.done')]"
        ".find(r => r.cells[1].textContent === arguments[0]);"
        "return row ? [row.innerText, row.querySelector('a.result').href] : null;", key)
    return (str(found[0]), str(found[1])) if found else None


def section_text(name: str) -> Callable[[WebDriver], str]:
    return lambda d: str(d.find_element(By.ID, name).text)


def console_errors(browser: WebDriver) -> list[dict[str, Any]]:
    return [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


@pytest.mark.e2e
async def test_browser_sees_a_document_go_from_in_progress_to_done(
        weed: Any, bucket: str, s3: Any, browser: WebDriver) -> None:
    engine = GatedEngine()
    settings = make_settings(weed, bucket, status_page=True)
    key = "input/отчёт за квартал.tiff"
    async with daemon_running(settings, engine) as daemon:
        await asyncio.to_thread(browser.get, f"http://127.0.0.1:{daemon.http.port}/")
        await until(browser, lambda d: "nothing" in section_text("in-progress")(d))
        s3.put_object(Bucket=bucket, Key=key,
                      Body=make_tiff([["Отчёт страница 1"], ["Страница 2"], ["Страница 3"]]))
        daemon.poke()
        await asyncio.wait_for(engine.entered.wait(), 60)
        # The page refreshes itself: no reload here.
        await until(browser, lambda d: key in section_text("in-progress")(d)
                    and "0 / 3" in section_text("in-progress")(d))
        # The same progress on /health and /metrics.
        base = f"http://127.0.0.1:{daemon.http.port}"
        health = json.loads((await get(f"{base}/health"))[1])["in_progress"]
        assert health["documents"] == 1 and (health["pages_done"], health["pages_total"]) == (0, 3)
        assert [d["key"] for d in health["shown"]] == [key]
        metrics = (await get(f"{base}/metrics"))[1]
        assert 'watcher_document_pages{state="total"} 3.0' in metrics
        assert "watcher_documents_in_progress 1.0" in metrics
        engine.gate.set()
        await until(browser, lambda d: finished_row(d, key) is not None)
        row = finished_row(browser, key)
        assert row is not None
        text, link = row
        assert "\tdone\t3\t" in text
        await until(browser, lambda d: "nothing" in section_text("in-progress")(d))
        await asyncio.to_thread(browser.get, link)
        result = json.loads(browser.find_element(By.TAG_NAME, "body").text)
        assert result["source"]["key"] == key and len(result["pages"]) == 3
        assert console_errors(browser) == []


@pytest.mark.e2e
async def test_browser_asks_for_the_token_and_then_shows_the_page(
        weed: Any, bucket: str, browser: WebDriver) -> None:
    settings = make_settings(weed, bucket, status_page=True, webhook_token=TOKEN)
    async with daemon_running(settings) as daemon:
        await asyncio.to_thread(browser.get, f"http://127.0.0.1:{daemon.http.port}/")
        form = browser.find_element(By.ID, "token")
        await until(browser, lambda d: form.is_displayed())
        assert not browser.find_elements(By.ID, "summary")
        form.find_element(By.NAME, "token").send_keys(TOKEN)
        form.find_element(By.TAG_NAME, "button").click()
        await until(browser, lambda d: "backlog" in d.find_element(By.ID, "summary").text.lower()
                    or "documents waiting" in d.find_element(By.ID, "summary").text)
        assert not form.is_displayed()
        # The 401 of the first load is the browser's own log line; nothing else went wrong.
        assert [e for e in console_errors(browser) if "401" not in e["message"]] == []

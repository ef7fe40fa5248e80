"""The dashboard in a real browser (Debian's headless Chromium driven by Playwright) against a
running service with a simulated fleet: sign in with a key, read the fleet numbers the API
gives, watch a live event's chart move. Screenshots are kept in ``test-artifacts/``."""

from __future__ import annotations

import io
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists() and shutil.which("chromium") is None,
        reason="Debian's chromium is not installed (apt-get install chromium; make test does it)",
    ),
]


@pytest.fixture()
async def demo(tmp_path: Path) -> AsyncIterator[Any]:
    """The demo's service and simulated fleet, small and fast: 400 homes, clock ×120."""
    from rich.console import Console

    from cli.demo import Demo, DemoOptions

    opts = DemoOptions(
        devices=400,
        time_scale=120.0,
        window_h=1.0,
        lead_min=10,
        drop_fraction=0.05,
        hold=False,
        workdir=tmp_path,
        log_to_file=False,
    )
    d = Demo(opts, Console(file=io.StringIO(), width=120))
    try:
        await d.start_service()
        await d.start_fleet()
        yield d
    finally:
        await d.close()


@pytest.fixture()
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    executable = str(CHROMIUM) if CHROMIUM.exists() else shutil.which("chromium")
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


async def _shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)


async def _number(page: Any, selector: str) -> float:
    text = (await page.locator(selector).inner_text()).replace(",", "").split()[0]
    return float(text)


async def test_sign_in_fleet_matches_api_and_event_chart_moves(demo: Any, browser: Any):
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    # The page loads without a key and asks for one.
    await page.goto(demo.base_url + "/")
    await page.wait_for_selector("#key-input", state="visible")
    await _shot(page, "0-login")

    # A wrong key is refused on the form, with the reason.
    await page.fill("#key-input", "vpp_wrong_key")
    await page.click("#login-button")
    await page.wait_for_function(
        "document.getElementById('login-error').textContent.includes('401')"
    )

    # Sign in with the operator's key: the fleet page shows what the API says.
    await page.fill("#key-input", demo.keys["operator"])
    await page.click("#login-button")
    await page.wait_for_selector("#fleet-table tbody tr[data-kind='battery']")
    api_fleet = await demo.api("GET", "/v1/fleet", "operator")
    registered = sum(r["registered"] for r in api_fleet["regions"])
    assert await _number(page, "[data-testid=fleet-registered]") == registered
    for row in api_fleet["regions"]:
        cells = page.locator(
            f"#fleet-table tr[data-region='{row['region']}'][data-kind='{row['kind']}'] td"
        )
        assert (await cells.nth(2).inner_text()).replace(",", "") == str(row["registered"])
    # Online and available MW move with the fleet: compare with a fresh answer, loosely.
    api_fleet = await demo.api("GET", "/v1/fleet", "operator")
    online_api = api_fleet["totals"]["online"]
    assert abs(await _number(page, "[data-testid=fleet-online]") - online_api) <= max(
        5, 0.05 * online_api
    )
    shown_mw = float(await page.locator("[data-testid=fleet-available]").get_attribute("data-mw"))
    assert shown_mw == pytest.approx(api_fleet["totals"]["available_mw"], rel=0.25, abs=0.05)
    # The key stays in this tab's session storage, and the address bar does not carry it.
    stored = await page.evaluate("sessionStorage.getItem('vpp.apiKey')")
    assert stored == demo.keys["operator"]
    assert "key=" not in page.url
    await _shot(page, "1-fleet")

    await page.click("#nav a[data-page=forecast]")
    await page.wait_for_selector("#forecast-chart .uplot")
    await _shot(page, "2-forecast")

    # A buyer's request, committed, then run by the service.
    req = await demo.quote_and_commit()
    assert req is not None and req["status"] == "committed", req
    await page.click("#nav a[data-page=requests]")
    await page.wait_for_selector(f"#requests-table tr[data-id='{req['id']}']")
    await page.click(f"#requests-table tr[data-id='{req['id']}']")
    await page.wait_for_selector("#request-detail:not([hidden])")
    await _shot(page, "3-requests")

    # Live event: the chart gains minutes while the window runs.
    window = demo.run_window(req)
    import asyncio

    runner = asyncio.create_task(window)
    try:
        await page.goto(f"{demo.base_url}/#events/{req['id']}")
        points = "Number(document.getElementById('event-chart').dataset.points || 0)"
        await page.wait_for_function(f"{points} >= 2", timeout=90_000)
        first = await page.evaluate(points)
        await page.wait_for_function(f"{points} >= {first + 3}", timeout=60_000)
        moved = await page.evaluate(points)
        assert moved > first
        assert await page.locator("#event-chart .uplot").count() == 1
        commanded = await _number(page, "[data-testid=ev-commanded]")
        assert commanded > 0
        await _shot(page, "4-event")
        await runner
    finally:
        if not runner.done():
            runner.cancel()

    await demo.settle(req["id"])
    await page.goto(f"{demo.base_url}/#settlement/{req['id']}")
    await page.wait_for_selector("#settlement-table tbody tr")
    # The page shows the API's own figures (one function over the same intervals as the JSON,
    # the CSV and the demo's report), not averages of its own.
    api_req = await demo.api("GET", f"/v1/capacity-requests/{req['id']}", "operator")
    delivery = api_req["delivery"]
    assert delivery is not None and delivery["intervals"] == delivery["expected_intervals"]
    assert api_req["performance"] == delivery["performance"]
    want_pct = f"{delivery['performance'] * 100:.1f} %"
    got_pct = await page.locator("[data-testid=st-performance]").inner_text()
    assert got_pct == want_pct
    got_mw = await _number(page, "[data-testid=st-delivered]")
    assert got_mw == pytest.approx(delivery["delivered_mw"], abs=0.0051)
    await _shot(page, "5-settlement")

    # Signing out forgets the key.
    await page.click("#logout")
    assert await page.evaluate("sessionStorage.getItem('vpp.apiKey')") is None
    await page.wait_for_selector("#key-input", state="visible")
    assert errors == []

"""The web console in a real headless Chromium (Debian's, driven by Playwright; no browser
download) against `gb28181 serve` and `gb28181-sim` as users run them: it loads without script
errors, signs in (API token, user account), shows the simulated devices' channels in the tree
with their state, plays live video over HTTP-FLV (mpegts.js) and over WebRTC (WHEP) — the video
element's clock runs and a screenshot of it is not blank —, plays back a record from the
timeline, draws the channels on the map with no tiles configured, sends PTZ commands from the
pad, shows the online-rate dashboard and alarms as they come.

One server and one fleet serve the whole module. Screenshots go to the test's tmp_path (their
paths are printed); with ``GB28181_ARTIFACTS=DIR`` set they are copied there too.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import pytest

from .conftest import TOKEN, ServedServer, SimProcess, http, listed, wait_until

pytestmark = pytest.mark.slow

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--autoplay-policy=no-user-gesture-required",
                 # WebRTC on a test machine: offer real host addresses, not mDNS names.
                 "--disable-features=WebRtcHideLocalIpsWithMdns"]
DEVICES = 2
#: Where screenshots are copied besides tmp_path (read now: conftest clears GB28181_* per test).
ARTIFACTS = os.environ.get("GB28181_ARTIFACTS")


# -- one server and one fleet for the module ---------------------------------------------------

class Fleet:
    def __init__(self, server: ServedServer, sim: SimProcess, channels: list[dict]) -> None:
        self.server, self.sim, self.channels = server, sim, channels

    @property
    def channel_ids(self) -> list[str]:
        return [c["channel_id"] for c in self.channels]

    def ptz_count(self) -> int:
        """The simulator's latest progress line's PTZ command count."""
        counts = [line.rsplit("ptz ", 1)[1].split()[0] for line in self.sim.log().splitlines() if " ptz " in line]
        return int(counts[-1]) if counts else 0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (scripts/test.sh installs Debian's chromium)")
    workdir = tmp_path_factory.mktemp("console")
    server = ServedServer(workdir, GB28181_MEDIA__WORKERS="1").start()
    sim = SimProcess(workdir, server, "--devices", str(DEVICES), "--keepalive-interval", "5",
                     "--video-size", "320x240", "--gop", "25", "--progress", "0.5",
                     "--missing-location-ratio", "0", "--records", "1", "--alarm-interval", "2")
    try:
        def channels():
            status, body = server.api("/api/v1/channels?kind=channel&limit=100")
            found = [c for c in listed(body) if c["state"] == "ON"] if status == 200 else []
            return len(found) >= DEVICES and found
        found = wait_until(channels, 30, f"{DEVICES} simulated channels online",
                           lambda: server.exited() or sim.exited())
        yield Fleet(server, sim, sorted(found, key=lambda c: c["channel_id"]))
    finally:
        sim.stop()
        server.kill()


@pytest.fixture(scope="module")
def browser(fleet):
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Page:
    """A fresh browser context on the console, with its console errors collected."""

    def __init__(self, browser, fleet: Fleet, tmp_path: Path) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.fleet, self.tmp_path = fleet, tmp_path

    def unexpected_errors(self) -> list[str]:
        """Console errors other than the 401s of signing in (asking "who am I?" unsigned, a
        wrong token or password), which the browser logs as failed loads."""
        return [e for e in self.errors if "status of 401" not in e]

    def open(self, query: str = "") -> Page:
        self.page.goto(f"{self.fleet.server.base}/?token={TOKEN}{query}")
        self.page.wait_for_selector("#tree[data-loaded=true]", timeout=15000)
        return self

    def screenshot(self, selector: str, name: str) -> bytes:
        path = self.tmp_path / name
        png = self.page.locator(selector).screenshot(path=str(path))
        print(f"screenshot: {path}")
        if ARTIFACTS:
            target = Path(ARTIFACTS)
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target / name)
        return png

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def console(browser, fleet, tmp_path):
    pages: list[Page] = []

    def factory() -> Page:
        pages.append(Page(browser, fleet, tmp_path))
        return pages[-1]

    yield factory
    for page in pages:
        page.close()


def not_blank(png: bytes) -> float:
    """The pixel standard deviation of a screenshot (PNG decoded by FFmpeg through PyAV)."""
    import av
    with av.open(io.BytesIO(png), format="png_pipe") as container:
        frame = next(container.decode(video=0))
    pixels = frame.to_ndarray(format="gray")
    return float(pixels.std())


def assert_plays(page: Page, transport: str, name: str) -> None:
    """The video element plays over ``transport``: its clock advances and it shows a picture."""
    p = page.page
    p.wait_for_selector(f"video[data-transport={transport}]", timeout=20000)
    p.wait_for_function("() => { const v = document.querySelector('video'); "
                        "return v.readyState >= 2 && v.videoWidth > 0 && v.currentTime > 0; }", timeout=20000)
    t0 = p.evaluate("document.querySelector('video').currentTime")
    time.sleep(2.5)
    t1 = p.evaluate("document.querySelector('video').currentTime")
    assert t1 - t0 > 1.0, f"{transport}: currentTime went from {t0} to {t1} in 2.5 s"
    size = p.evaluate("(() => { const v = document.querySelector('video'); return [v.videoWidth, v.videoHeight] })()")
    assert size == [320, 240], size
    spread = not_blank(page.screenshot("video", name))
    assert spread > 5, f"{transport}: the screenshot of the video is blank (pixel std {spread:.1f})"


# -- the tests -----------------------------------------------------------------------------------

def test_console_loads_and_signs_in_with_an_api_token(console, fleet):
    page = console()
    p = page.page
    resp = p.goto(fleet.server.base + "/")
    assert resp is not None and resp.status == 200
    assert p.title() == "GB28181 console"
    assert "default-src 'self'" in resp.headers["content-security-policy"]
    p.wait_for_selector("#signin:not([hidden])")
    p.fill("#signin-token", "wrong-token")
    p.click("#token-form button")
    p.wait_for_selector("#signin-error:has-text('refused')")
    p.fill("#signin-token", TOKEN)
    p.click("#token-form button")
    p.wait_for_selector("#tree[data-loaded=true]", timeout=15000)
    assert p.is_hidden("#signin")
    # ?token= is taken out of the address bar once kept.
    page.open()
    assert "token" not in p.url
    assert not page.unexpected_errors(), page.errors


def test_user_signs_in_with_a_password(console, fleet):
    status, body = http(fleet.server.base + "/api/v1/session", "POST", {"username": "nobody", "password": "x" * 8})
    if status in (404, 405) or (status == 401 and "missing or wrong" in str(body)):
        pytest.skip("POST /api/v1/session (user accounts) is not on this server yet")
    status, body = fleet.server.api("/api/v1/users", "POST",
                                    {"name": "watcher", "password": "correct horse", "role": "operator"})
    assert status in (200, 201), body
    page = console()
    p = page.page
    p.goto(fleet.server.base + "/")
    p.fill("#signin-user", "watcher")
    p.fill("#signin-password", "wrong password")
    p.click("#signin-form button")
    p.wait_for_selector("#signin-error:has-text('Sign-in failed')")
    p.fill("#signin-password", "correct horse")
    p.click("#signin-form button")
    p.wait_for_selector("#tree[data-loaded=true]", timeout=15000)
    assert "watcher" in p.inner_text("#who")
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies["gb28181_session"]["httpOnly"]
    # A reload keeps the session (cookie); signing out ends it.
    p.reload()
    p.wait_for_selector("#tree[data-loaded=true]", timeout=15000)
    p.click("#signout")
    p.wait_for_selector("#signin:not([hidden])")
    p.reload()
    p.wait_for_selector("#signin:not([hidden])")
    assert not page.unexpected_errors(), page.errors


def test_tree_shows_the_simulated_channels_with_their_state(console, fleet):
    page = console().open()
    p = page.page
    for channel_id in fleet.channel_ids:
        p.wait_for_selector(f'.channel[data-channel-id="{channel_id}"][data-state=ON]', timeout=10000)
    assert f"{DEVICES} of {DEVICES} channels online" in p.inner_text("#tree-summary")
    page.screenshot(".side", "tree-civil.png")
    p.click(".tree-by[data-by=group]")
    p.wait_for_selector(f'.channel[data-channel-id="{fleet.channel_ids[0]}"]', timeout=10000)
    assert p.locator(".channel").count() == DEVICES
    assert not page.errors, page.errors


def test_live_over_http_flv(console, fleet):
    page = console().open("&transport=flv")
    page.page.click(f'.channel[data-channel-id="{fleet.channel_ids[0]}"] button')
    assert_plays(page, "flv", "live-flv.png")
    assert "FLV" in page.page.inner_text("#player-status")
    assert not page.errors, page.errors


def test_live_falls_back_to_flv_when_webrtc_fails(console, fleet):
    page = console()
    # The WHEP endpoint refuses (as a server without WebRTC, or one whose WebRTC broke, would).
    page.page.route("**/whep", lambda route: route.fulfill(
        status=503, content_type="application/json", body='{"error": "WebRTC is not available"}'))
    page.open()
    page.page.click(f'.channel[data-channel-id="{fleet.channel_ids[1]}"] button')
    assert_plays(page, "flv", "live-fallback.png")
    assert [e for e in page.errors if "status of 503" not in e] == [], page.errors


def test_live_over_webrtc(console, fleet):
    channel_id = fleet.channel_ids[1]
    status, _ = http(f"{fleet.server.base}/api/v1/channels/{channel_id}/whep", "POST", "not sdp", TOKEN)
    if status in (404, 405):
        pytest.skip("POST /api/v1/channels/{id}/whep (WebRTC) is not on this server yet")
    page = console().open("&transport=webrtc")
    page.page.click(f'.channel[data-channel-id="{channel_id}"] button')
    try:
        assert_plays(page, "webrtc", "live-webrtc.png")
    except Exception:
        print("player status:", page.page.inner_text("#player-status"))
        raise
    assert not page.errors, page.errors


def test_ptz_pad_sends_commands(console, fleet):
    page = console().open("&transport=flv")
    p = page.page
    before = fleet.ptz_count()
    p.click(f'.channel[data-channel-id="{fleet.channel_ids[0]}"] button')
    p.click("[data-ptz=left]")  # pressed: left; released: stop
    p.wait_for_selector("#ptz-status:has-text('stop sent')", timeout=10000)
    p.click("[data-ptz=zoomin]")
    p.wait_for_selector("#ptz-status:has-text('stop sent')", timeout=10000)
    wait_until(lambda: fleet.ptz_count() >= before + 4, 10, "4 PTZ commands at the simulator")
    status, body = fleet.server.api("/api/v1/audit?limit=200")
    commands = [e.get("command") for e in body["entries"] if e.get("action") == "ptz"
                and e.get("target") == fleet.channel_ids[0]]
    assert {"left", "zoomin", "stop"} <= set(commands), commands
    assert not page.errors, page.errors


def test_map_draws_the_channels_without_tiles(console, fleet):
    page = console().open()
    p = page.page
    p.click(".view-tab[data-view=map]")
    p.wait_for_selector(f"#map[data-points='{DEVICES}']", timeout=10000)
    assert p.locator("path.channel-point").count() == DEVICES
    assert "no map tiles configured" in p.inner_text("#map-status")
    page.screenshot("#map", "map.png")
    assert not page.errors, page.errors


def test_playback_from_the_timeline(console, fleet):
    page = console().open("&transport=flv")
    p = page.page
    p.click(f'.channel[data-channel-id="{fleet.channel_ids[0]}"] button')
    p.click(".view-tab[data-view=playback]")
    p.wait_for_selector("#timeline .seg", timeout=15000)
    seg = p.locator("#timeline .seg").first
    seg.click()
    assert_plays(page, "flv", "playback.png")
    p.select_option("#pb-speed", "2")
    p.wait_for_selector("#pb-status:has-text('speed ×2 sent')", timeout=10000)
    page.screenshot(".player-view", "playback-view.png")
    assert not page.errors, page.errors


def test_dashboard_and_live_alarms(console, fleet):
    page = console().open()
    p = page.page
    status, body = fleet.server.api(f"/api/v1/channels/{fleet.channel_ids[0]}", "PATCH", {"tier": 1})
    assert status == 200, body
    p.click(".view-tab[data-view=dashboard]")
    p.wait_for_selector("#dash-tier tr[data-group='1']", timeout=10000)
    # Tier 1 against its target (>= 95 %), the rest without one.
    assert "≥ 95.0 % met" in p.inner_text("#dash-tier tr[data-group='1']")
    assert p.locator("#dash-civil tr[data-group]").count() >= 1
    page.screenshot("#view-dashboard", "dashboard.png")
    p.click(".view-tab[data-view=alarms]")
    rows = p.locator("#alarm-rows tr").count()
    # The simulator raises an alarm about every 2 s per device: new rows come over the feed.
    p.wait_for_function("rows => document.querySelectorAll('#alarm-rows tr.fresh').length > 0 "
                        "&& document.querySelectorAll('#alarm-rows tr').length > rows", arg=rows, timeout=15000)
    assert not page.errors, page.errors

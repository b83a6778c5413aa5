"""Mobile positions (GB/T 28181-2016 §9.11.2, A.2.4 h MobilePosition query, A.2.5 e Notify
MobilePosition): body parsing, the simulator's loops, schema 5 storage and pruning, a crafted
device over real sockets, and end to end on the shipped server with moving simulated devices."""

from __future__ import annotations

import asyncio
import json
import math
import re
import sqlite3
import statistics
import time
from datetime import datetime

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gb28181 import manscdp
from gb28181.config import EventsSection, PositionsSection
from gb28181.events import EventBus
from gb28181.positions import PositionError, PositionService, parse_position
from registry import Channel, ChannelRegistry, Device, DeviceRegistry, PositionEvent, SqliteStore
from registry.sqlite import SCHEMA_VERSION
from registry.writebehind import Persistence
from simulators.fleet import FleetConfig
from simulators.mobile import Loop, is_mobile

from .conftest import wait_until
from .sipclient import RawSip

DEV = "34020000001320000001"
DEV2 = "34020000001320000002"


def position_body(inner: str, *, device_id: str = DEV, sn: int = 3, root: str = "Notify",
                  decl: str = '<?xml version="1.0" encoding="GB2312"?>') -> bytes:
    return (f"{decl}\r\n<{root}>\r\n<CmdType>MobilePosition</CmdType>\r\n<SN>{sn}</SN>\r\n"
            f"<DeviceID>{device_id}</DeviceID>\r\n{inner}</{root}>\r\n").encode("gb18030")


def parse(inner: str, **kw) -> PositionEvent | None:
    return parse_position(manscdp.parse(position_body(inner, **kw)), DEV, 1000.0)


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# -- parsing Notify MobilePosition (A.2.5 e) ------------------------------------------------------

def test_a_full_body():
    p = parse("<Time>2026-11-30T10:00:00</Time><Longitude>116.3974</Longitude><Latitude>39.9087</Latitude>"
              "<Speed>42.5</Speed><Direction>90</Direction><Altitude>51.2</Altitude>")
    assert p == PositionEvent(DEV, DEV, ts("2026-11-30T10:00:00+08:00"), 116.3974, 39.9087, 42.5,
                              90.0, 51.2, 1000.0)


@pytest.mark.parametrize("inner, kw, check", [
    # only what A.2.5 requires: no Speed, Direction, Altitude
    ("<Time>2026-11-30T10:00:00</Time><Longitude>120</Longitude><Latitude>30</Latitude>", {},
     lambda p: (p.speed, p.direction, p.altitude) == (None, None, None) and p.longitude == 120.0),
    # a space for T, milliseconds, a zone; padding around values
    ("<Time>2026-11-30 02:00:00.250Z</Time><Longitude> 120.5 </Longitude><Latitude>\n30.25</Latitude>", {},
     lambda p: p.time == pytest.approx(ts("2026-11-30T02:00:00.250+00:00")) and p.latitude == 30.25),
    # no Time at all, or an unreadable one: the fix is kept, ordered by our receive time
    ("<Longitude>120</Longitude><Latitude>30</Latitude>", {}, lambda p: p.time is None),
    ("<Time>yesterday</Time><Longitude>120</Longitude><Latitude>30</Latitude>", {}, lambda p: p.time is None),
    # a heading west given as -90 is 270 clockwise from north; a negative or unreadable speed is dropped
    ("<Longitude>120</Longitude><Latitude>30</Latitude><Direction>-90</Direction><Speed>-3</Speed>", {},
     lambda p: p.direction == 270.0 and p.speed is None),
    ("<Longitude>120</Longitude><Latitude>30</Latitude><Speed>fast</Speed><Altitude>nan</Altitude>", {},
     lambda p: p.speed is None and p.altitude is None),
    # the fix of one of the device's cameras (an NVR or lower platform reporting for it)
    ("<Longitude>-70.1</Longitude><Latitude>-33.4</Latitude>", {"device_id": "34020000001310000001"},
     lambda p: (p.device_id, p.target_id, p.longitude, p.latitude) == (DEV, "34020000001310000001", -70.1, -33.4)),
])
def test_vendor_variants(inner, kw, check):
    p = parse(inner, **kw)
    assert p is not None and check(p)


@pytest.mark.parametrize("inner", [
    "<Time>2026-11-30T10:00:00</Time><Longitude>0</Longitude><Latitude>0</Latitude>",
    "<Time>2026-11-30T10:00:00</Time><Longitude>0.000000</Longitude><Latitude>0.0</Latitude><Speed>0</Speed>",
    "<Time>2026-11-30T10:00:00</Time>",
    "<Longitude></Longitude><Latitude></Latitude>",
])
def test_no_fix_is_not_a_position(inner):
    assert parse(inner) is None


def test_dahua_indented_lf_body():
    body = position_body("<Time>2026-11-30 10:00:00</Time>\n  <Longitude>116.1</Longitude>\n"
                         "  <Latitude>39.1</Latitude>\n  <Speed>30.0</Speed>\n",
                         decl='<?xml version="1.0" encoding="GB2312" ?>').replace(b"\r\n", b"\n")
    p = parse_position(manscdp.parse(body), DEV, 0.0)
    assert p is not None and (p.time, p.longitude, p.speed) == (ts("2026-11-30T10:00:00+08:00"), 116.1, 30.0)


@pytest.mark.parametrize("inner, kw, field, words", [
    ("<Longitude>east</Longitude><Latitude>30</Latitude>", {}, "Longitude", "'east' is not a number"),
    ("<Longitude>120</Longitude><Latitude>95</Latitude>", {}, "Latitude", "±90"),
    ("<Longitude>181</Longitude><Latitude>30</Latitude>", {}, "Longitude", "±180"),
    ("<Longitude>inf</Longitude><Latitude>30</Latitude>", {}, "Longitude", "±180"),
    ("<Longitude>120</Longitude>", {}, "Latitude", "needs both coordinates"),
    ("<Latitude>30</Latitude>", {}, "Longitude", "needs both coordinates"),
    ("<Longitude>120</Longitude><Latitude>30</Latitude>", {"device_id": ""}, "DeviceID", "without DeviceID"),
    ("<Longitude>120</Longitude><Latitude>30</Latitude>", {"device_id": "a b;c"}, "DeviceID",
     "not a device code"),
])
def test_garbage_is_refused_with_the_reason(inner, kw, field, words):
    with pytest.raises(PositionError) as info:
        parse(inner, **kw)
    assert info.value.field == field and words in str(info.value)


def test_another_cmd_type_is_refused():
    msg = manscdp.parse(position_body("").replace(b"MobilePosition", b"Alarm"))
    with pytest.raises(PositionError, match="CmdType 'Alarm'"):
        parse_position(msg, DEV, 0.0)


_TEXT = st.one_of(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<&"), max_size=20),
                  st.floats(allow_nan=True, allow_infinity=True).map(str),
                  st.integers(-400, 400).map(str))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["Time", "Longitude", "Latitude", "Speed", "Direction", "Altitude"]),
                       _TEXT), _TEXT)
# Found by hypothesis: a tiny negative direction modulo 360 rounds to 360.0.
@example({"Longitude": "0", "Latitude": "1", "Direction": "-7.513242310964381e-65"}, "0")
def test_any_field_values_give_a_fix_no_fix_or_a_position_error(fields, device_id):
    inner = "".join(f"<{k}>{v}</{k}>" for k, v in fields.items())
    try:
        msg = manscdp.parse(position_body(inner, device_id=device_id))
    except manscdp.ManscdpError:
        return
    try:
        p = parse_position(msg, DEV, 0.0)
    except PositionError as exc:
        assert exc.field in ("DeviceID", "Longitude", "Latitude") and str(exc)
        return
    if p is None:
        return
    assert math.isfinite(p.longitude) and abs(p.longitude) <= 180
    assert math.isfinite(p.latitude) and abs(p.latitude) <= 90
    assert p.direction is None or 0 <= p.direction < 360
    assert p.speed is None or p.speed >= 0
    assert all(v is None or math.isfinite(v) for v in (p.time, p.speed, p.altitude))


# -- the simulator's loops ---------------------------------------------------------------------

def metres(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Distance between two (lon, lat) points a few km apart (equirectangular)."""
    lat = math.radians((a[1] + b[1]) / 2)
    return math.hypot((b[0] - a[0]) * 111_320.0 * math.cos(lat), (b[1] - a[1]) * 111_320.0)


def test_a_loop_is_seeded_and_driven_at_its_speed_and_heading():
    loop = Loop.of(1, DEV)
    assert loop == Loop.of(1, DEV) and loop != Loop.of(2, DEV) and loop != Loop.of(1, DEV2)
    t = 1_800_000_000.0
    a, b = loop.at(t), loop.at(t + 1.0)
    assert metres((a.longitude, a.latitude), (b.longitude, b.latitude)) == pytest.approx(loop.speed / 3.6, rel=0.01)
    # the heading is where it goes: bearing of the next 0.1 s, clockwise from north
    c = loop.at(t + 0.1)
    east = (c.longitude - a.longitude) * math.cos(math.radians(a.latitude))
    bearing = math.degrees(math.atan2(east, c.latitude - a.latitude)) % 360
    assert abs((bearing - a.direction + 180) % 360 - 180) < 1.0
    assert metres((a.longitude, a.latitude), (loop.longitude, loop.latitude)) == pytest.approx(loop.radius, rel=0.01)


def test_which_devices_move():
    ids = [f"3402000000132{n:07d}" for n in range(1, 201)]
    count = FleetConfig(mobile=3)
    assert [i for i in ids if is_mobile(count, i)] == ids[:3]
    share = [i for i in ids if is_mobile(FleetConfig(mobile=0.25), i)]
    assert 25 <= len(share) <= 75 and share == [i for i in ids if is_mobile(FleetConfig(mobile=0.25), i)]
    assert not any(is_mobile(FleetConfig(), i) for i in ids)


# -- storage (schema version 5), the latest fix, pruning --------------------------------------------

class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_fixes_are_stored_with_the_device_batch_and_pruned_after_keep_days(tmp_path):
    clock = FakeClock(1_800_000_000.0)
    store = SqliteStore(tmp_path / "db.sqlite")
    persistence = Persistence(store, flush_interval=0.05)
    registry = DeviceRegistry(store, persistence=persistence)
    channels = ChannelRegistry(store, persistence=persistence)
    await registry.start()
    await channels.start()
    device = registry.add(Device(device_id=DEV, kind="ipc", online=True))
    camera, _ = channels.upsert(Channel(channel_id="34020000001310000001", device_id=DEV, kind="channel",
                                        longitude=1.0, latitude=2.0))
    area, _ = channels.upsert(Channel(channel_id="340200", device_id=DEV, kind="civil-code"))
    bus = EventBus(EventsSection())
    service = PositionService(config=PositionsSection(keep_days=2), registry=registry, channels=channels,
                              bus=bus, clock=clock)
    day = 86400.0
    for n in range(6):  # one fix every 12 hours, the last now
        clock.now = 1_800_000_000.0 - (5 - n) * day / 2
        service.on_notify(device, manscdp.parse(position_body(
            f"<Longitude>{116 + n / 10}</Longitude><Latitude>39.9</Latitude><Speed>{n}</Speed>")))
    service.on_notify(device, manscdp.parse(position_body("<Longitude>0</Longitude><Latitude>0</Latitude>")))
    track = await registry.position_events(DEV)
    assert [p.longitude for p in track] == [116.0, 116.1, 116.2, 116.3, 116.4, 116.5]
    assert [p.speed for p in track] == [0, 1, 2, 3, 4, 5] and service.no_fix == 1
    assert [p.longitude for p in await registry.position_events(DEV, since=clock.now - day)] == [116.3, 116.4, 116.5]
    assert [p.longitude for p in await registry.position_events(DEV, until=clock.now - day, limit=2)] == [116.0, 116.1]
    # the device shows its latest fix; its camera follows it, the civil-code node does not
    assert device.extra["position"]["longitude"] == 116.5 and device.extra["position"]["speed"] == 5
    assert (camera.longitude, camera.latitude) == (116.5, 39.9) and area.longitude is None
    # published once committed
    await registry.flush()
    await asyncio.sleep(0)
    assert [json.loads(e.body)["data"]["longitude"] for e in bus.ring if e.type == "position"] == \
        [116.0, 116.1, 116.2, 116.3, 116.4, 116.5]
    # keep_days 2: the fixes received more than 48 h ago go
    assert await service.prune() == 1
    assert [p.longitude for p in await registry.position_events(DEV)] == [116.1, 116.2, 116.3, 116.4, 116.5]
    clock.now += day
    assert await service.prune() == 2 and service.pruned == 3
    await channels.stop()
    await registry.stop()
    con = sqlite3.connect(tmp_path / "db.sqlite")
    assert con.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    assert con.execute("SELECT COUNT(*) FROM positions").fetchone() == (3,)
    stored = json.loads(con.execute("SELECT extra FROM devices").fetchone()[0])
    assert stored["position"]["longitude"] == 116.5
    con.close()


# -- a crafted device over real sockets: MESSAGE Notify MobilePosition -----------------------------

QUIET = {"registration": {"query_device_info": False, "query_basic_param": False},
         "catalog": {"query_on_register": False, "subscribe": False}}


async def test_a_position_message_gets_200_and_garbage_a_400_with_the_reason(make_server):
    server = await make_server(**QUIET)
    async with RawSip(server.sip_port) as dev:
        assert (await dev.register()).status == 200
        dev.send(dev.message_bytes(position_body(
            "<Time>2026-11-30 10:00:00</Time><Longitude>116.5</Longitude><Latitude>39.95</Latitude>"
            "<Speed>36</Speed><Direction>45</Direction>").decode("gb18030")))
        ok = await dev.recv()
        assert ok.status == 200 and ok.body == b""
        dev.send(dev.message_bytes(position_body("<Longitude>116.5</Longitude><Latitude>north</Latitude>").decode()))
        bad = await dev.recv()
        assert bad.status == 400 and "Latitude 'north' is not a number" in bad.reason
        dev.send(dev.message_bytes(position_body("<Longitude>0</Longitude><Latitude>0</Latitude>").decode()))
        assert (await dev.recv()).status == 200
    track = await server.registry.position_events(DEV)
    assert [(p.longitude, p.latitude, p.speed, p.direction, p.time) for p in track] == \
        [(116.5, 39.95, 36.0, 45.0, ts("2026-11-30T10:00:00+08:00"))]
    assert server.positions.rejected["Latitude"] == 1 and server.positions.no_fix == 1
    assert server.registry.get(DEV).extra["position"]["latitude"] == 39.95


# -- end to end on the shipped server ------------------------------------------------------------

FAST = {"GB28181_KEEPALIVE__INTERVAL": "1", "GB28181_KEEPALIVE__COUNT": "3"}


def track(server, device_id: str = DEV, query: str = "") -> list[dict]:
    status, body = server.api(f"/api/v1/devices/{device_id}/positions?limit=10000{query}")
    assert status == 200, body
    return body["positions"]


def test_a_moving_device_is_tracked_at_the_subscribed_interval(served, sims, tmp_path):
    workdir = tmp_path / "mobile"
    server = served(workdir, **FAST)
    sim = sims(server, "--devices", "2", "--mobile", "1", "--mobile-seed", "7",
               "--keepalive-interval", "0.5", "--progress", "0.2")
    wait_until(lambda: server.api(f"/api/v1/devices/{DEV}/channels")[1].get("total"), 20,
               "the catalog", sim.exited)
    assert track(server) == []  # nothing is reported before the subscription
    status, sub = server.api(f"/api/v1/devices/{DEV}/position-subscription", "PUT",
                             {"interval": 1, "expires": 60})
    assert status == 200 and sub["subscribed"] and sub["interval"] == 1 and sub["expires"] == 60
    assert sub["event"].startswith("presence")
    fixes = wait_until(lambda: len(track(server)) >= 6 and track(server), 20, "six fixes", sim.exited)
    # the spacing of the stored fixes is the interval asked for (A.2.4 Interval)...
    received = [ts(p["received_at"]) for p in fixes]
    gaps = [b - a for a, b in zip(received, received[1:])]
    assert statistics.median(gaps) == pytest.approx(1.0, abs=0.1), gaps
    assert all(0.5 < g < 1.6 for g in gaps), gaps
    device_times = [ts(p["time"]) for p in fixes]
    assert all(abs(b - a - 1.0) < 0.1 for a, b in zip(device_times, device_times[1:])), device_times
    # ...and the points are the simulator's loop at the times the device reported
    loop = Loop.of(7, DEV)
    for p in fixes:
        want = loop.at(ts(p["time"]))
        assert metres((p["longitude"], p["latitude"]), (want.longitude, want.latitude)) < 0.5
        assert p["speed"] == pytest.approx(want.speed, abs=0.06)
        assert p["direction"] == pytest.approx(want.direction, abs=0.06)
        assert p["altitude"] == pytest.approx(want.altitude, abs=0.06)
        assert p["device_id"] == p["target_id"] == DEV
    # it moves: the track is not one point repeated
    assert metres((fixes[0]["longitude"], fixes[0]["latitude"]), (fixes[-1]["longitude"], fixes[-1]["latitude"])) > 5
    # the device shows its latest fix and its channels follow it
    status, device = server.api(f"/api/v1/devices/{DEV}")
    latest = track(server)[-1]
    assert status == 200 and device["position"]["received_at"] >= fixes[-1]["received_at"]
    assert ts(device["position"]["time"]) >= ts(latest["time"]) - 1.1
    channels = server.api(f"/api/v1/devices/{DEV}/channels")[1]["channels"]
    for ch in channels:
        assert metres((ch["longitude"], ch["latitude"]),
                      (device["position"]["longitude"], device["position"]["latitude"])) < 60  # ≤ 1 s apart
    # since/until select a window of the track, oldest first
    window = track(server, query=f"&since={fixes[1]['received_at'].replace('+', '%2B')}"
                                 f"&until={fixes[4]['received_at'].replace('+', '%2B')}")
    assert window == fixes[1:4]
    assert server.api(f"/api/v1/devices/{DEV}/positions?since=whenever")[0] == 400
    # every stored fix goes on the event feed as a 'position' event (once its commit is reported)

    def published() -> int:
        text = server.api("/metrics")[1].decode()
        found = re.search(r'gb28181_events_published_total\{type="position"\} (\d+)', text)
        return int(found.group(1)) if found else 0

    wait_until(lambda: published() >= len(fixes), 5, "position events")
    # a device that does not move refuses the subscription (489), and the API says so
    status, refused = server.api(f"/api/v1/devices/{DEV2}/position-subscription", "PUT", {"interval": 1})
    assert status == 502 and "489" in refused["error"]
    assert server.api(f"/api/v1/devices/{DEV}/position-subscription", "PUT", {"interval": 0})[0] == 400
    # unsubscribing stops the NOTIFYs
    status, state = server.api(f"/api/v1/devices/{DEV}/position-subscription")
    assert state["subscribed"] and state["notifies"] >= 6
    assert server.api(f"/api/v1/devices/{DEV}/position-subscription", "DELETE")[0] == 200
    assert server.api(f"/api/v1/devices/{DEV}/position-subscription")[1] == {"subscribed": False}
    assert server.api(f"/api/v1/devices/{DEV}/position-subscription", "DELETE")[0] == 404
    time.sleep(0.5)  # one NOTIFY may have been on its way
    stopped = len(track(server))
    time.sleep(3.0)
    assert len(track(server)) == stopped
    # positions survive a restart, and so does the device's latest fix
    before = track(server)
    sim.stop()
    server.stop()
    again = served(workdir, **FAST)
    assert track(again) == before
    status, device = again.api(f"/api/v1/devices/{DEV}")
    assert device["position"] == before[-1]
    assert server.error_lines() == [] and again.error_lines() == []


def test_devices_report_by_message_when_unsubscribed(served, sims):
    server = served(**FAST)
    sim = sims(server, "--devices", "1", "--mobile", "1", "--mobile-interval", "0.5", "--vendor", "dahua",
               "--keepalive-interval", "0.5")
    wait_until(lambda: server.api(f"/api/v1/devices/{DEV}")[0] == 200, 20, "the registration", sim.exited)
    fixes = wait_until(lambda: len(track(server)) >= 4 and track(server), 20, "fixes by MESSAGE", sim.exited)
    # dahua: Time with a space, no Altitude
    assert all(p["altitude"] is None and p["time"] for p in fixes)
    loop = Loop.of(1, DEV)
    for p in fixes:
        want = loop.at(ts(p["time"]))
        assert metres((p["longitude"], p["latitude"]), (want.longitude, want.latitude)) < 0.5
    status, metrics = server.api("/metrics")
    text = metrics.decode() if isinstance(metrics, bytes) else str(metrics)
    assert 'gb28181_positions_received_total{via="message"}' in text

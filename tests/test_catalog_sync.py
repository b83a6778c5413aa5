"""Issue 3 end to end: catalogs, subscriptions, the archive and online rates, over real sockets."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import aiohttp
import pytest

from gb28181.server import GbServer
from simulators.fleet import Fleet, FleetConfig

from .conftest import TOKEN, wait_for

pytestmark = pytest.mark.slow

NVR = "34020000001180000001"


def nvr_fleet(server: GbServer, **kw) -> Fleet:
    base = dict(server_port=server.sip_port, devices=1, nvr=True, channels=500, first_id=NVR,
                keepalive_interval=0.5, retry_min=0.3, register_rate=2000)
    base.update(kw)
    return Fleet(FleetConfig(**base))


async def api(server: GbServer, method: str, path: str, **kw) -> tuple[int, dict]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        async with http.request(method, f"http://127.0.0.1:{server.http_port}{path}", **kw) as r:
            return r.status, await r.json()


async def all_channels(server: GbServer, device_id: str) -> list[dict]:
    out, offset = [], 0
    while True:
        status, page = await api(server, "GET", f"/api/v1/devices/{device_id}/channels",
                                 params={"offset": str(offset), "limit": "1000"})
        assert status == 200, page
        out += page["channels"]
        offset += len(page["channels"])
        if offset >= page["total"] or not page["channels"]:
            return out


def fleet_channels(fleet: Fleet) -> dict:
    device = next(iter(fleet.devices.values()))
    return {ch.channel_id: ch for ch in device.channels}


@pytest.mark.parametrize("vendor,malformed", [("generic", False), ("hikvision", True), ("dahua", False)])
async def test_nvr_with_500_channels_syncs_completely(make_server, vendor, malformed):
    server = await make_server(catalog={"subscribe": False})
    fleet = nvr_fleet(server, vendor=vendor, malformed=malformed)
    await fleet.start()
    try:
        assert await fleet.wait_registered(10), fleet.summary()
        expected = fleet_channels(fleet)
        await wait_for(lambda: len(server.channels.of_device(NVR)) == len(expected), 20,
                       what=f"{len(expected)} channels synced ({vendor})")
        result = server.sync.last[NVR]
        assert result.complete and result.items == len(expected) and not result.error
        listed = {c["channel_id"]: c for c in await all_channels(server, NVR)}
        assert set(listed) == set(expected)
        for cid, ch in expected.items():
            got = listed[cid]
            assert got["name"] == ch.name, "names survive GB2312/GB18030 and repair"
            assert got["civil_code"] == ch.civil_code
            assert got["status"] == "online" and got["state"] == "ON"
            if ch.longitude is None:
                assert got["longitude"] is None
            else:
                assert got["longitude"] == pytest.approx(ch.longitude)
    finally:
        await fleet.stop()


async def test_notify_flips_a_channel_within_a_second_and_add_del(make_server):
    server = await make_server()
    fleet = nvr_fleet(server, channels=20)
    await fleet.start()
    try:
        assert await fleet.wait_registered(10)
        await wait_for(lambda: NVR in server.subscriptions.by_device, 10, what="catalog subscription")
        await wait_for(lambda: len(server.channels.of_device(NVR)) == 20, 10, what="20 channels")
        target = sorted(fleet_channels(fleet))[3]
        flipped = time.monotonic()
        fleet.set_channel_status(target, "OFF")
        await wait_for(lambda: server.channels.get(target).state == "OFF", 1.0,
                       what="the channel offline through NOTIFY within 1 s")
        assert time.monotonic() - flipped < 1.0
        status, body = await api(server, "GET", f"/api/v1/channels/{target}")
        assert status == 200 and body["status"] == "offline"
        fleet.set_channel_status(target, "VLOST")
        await wait_for(lambda: server.channels.get(target).state == "VLOST", 1.0, what="VLOST")
        fleet.set_channel_status(target, "ON")
        await wait_for(lambda: server.channels.get(target).state == "ON", 1.0, what="back ON")
        added = fleet.add_channel(NVR)
        await wait_for(lambda: server.channels.get(added.channel_id) is not None, 1.0, what="ADD")
        assert server.channels.get(added.channel_id).name == added.name
        fleet.remove_channel(added.channel_id)
        await wait_for(lambda: server.channels.get(added.channel_id) is None, 1.0, what="DEL")
        events = await server.channels.events(channel_id=target)
        assert [e.state for e in events][-4:] == ["ON", "OFF", "VLOST", "ON"]
    finally:
        await fleet.stop()


async def test_device_offline_takes_its_channels_offline(make_server):
    server = await make_server(catalog={"subscribe": False})
    fleet = nvr_fleet(server, channels=10)
    await fleet.start()
    assert await fleet.wait_registered(10)
    await wait_for(lambda: server.channels.counts().get("ON") == 10, 10, what="10 channels ON")
    await fleet.stop()
    await wait_for(lambda: server.channels.counts().get("OFF") == 10, 5,
                   what="channels OFF with their device")


async def test_periodic_catalog_catches_changes_without_a_subscription(make_server):
    server = await make_server(catalog={"subscribe": False, "refresh_interval": 1})
    fleet = nvr_fleet(server, channels=10)
    await fleet.start()
    try:
        assert await fleet.wait_registered(10)
        await wait_for(lambda: len(server.channels.of_device(NVR)) == 10, 10, what="10 channels")
        gone = sorted(fleet_channels(fleet))[0]
        fleet.remove_channel(gone)
        await wait_for(lambda: server.channels.get(gone) is None, 40,
                       what="the periodic catalog drops the removed channel")
    finally:
        await fleet.stop()


async def test_archive_report_lists_channels_without_coordinates(make_server):
    server = await make_server(catalog={"subscribe": False})
    fleet = nvr_fleet(server, channels=200, missing_location_ratio=0.1)
    await fleet.start()
    try:
        assert await fleet.wait_registered(10)
        await wait_for(lambda: len(server.channels.of_device(NVR)) == 200, 10, what="200 channels")
        missing = {cid for cid, ch in fleet_channels(fleet).items()
                   if ch.longitude is None or ch.latitude is None}
        assert missing, "the simulator left some channels without coordinates"
        status, report = await api(server, "GET", "/api/v1/reports/archive")
        assert status == 200
        assert report["channels"] == 200
        assert report["missing_location"] == len(missing)
        listed = {row["channel_id"] for row in report["incomplete"]
                  if "longitude" in row["missing"] or "latitude" in row["missing"]
                  or "location" in row["missing"]}
        assert listed == missing
        status, page = await api(server, "GET", "/api/v1/channels",
                                 params={"missing_location": "true", "limit": "1000"})
        assert {c["channel_id"] for c in page["channels"]} == missing
    finally:
        await fleet.stop()


async def test_online_rate_matches_a_scripted_outage(make_server, tmp_path):
    # Every camera is tier 1 by rule; 10 of 100 go OFF for a tenth of the window.
    server = await make_server(tiers={"rules": [{"tier": 1, "type_code": ["131", "132"]}]})
    fleet = nvr_fleet(server, channels=100)
    await fleet.start()
    try:
        assert await fleet.wait_registered(10)
        await wait_for(lambda: server.channels.counts().get("ON") == 100, 10, what="100 ON")
        await wait_for(lambda: NVR in server.subscriptions.by_device, 10, what="subscription")
        assert {c.tier for c in server.channels.of_device(NVR)} == {1}
        down = sorted(fleet_channels(fleet))[:10]
        start = time.time()
        await asyncio.sleep(0.5)
        for cid in down:
            fleet.set_channel_status(cid, "OFF")
        await wait_for(lambda: all(server.channels.get(c).state == "OFF" for c in down), 2, what="10 OFF")
        await asyncio.sleep(0.5)
        for cid in down:
            fleet.set_channel_status(cid, "ON")
        await wait_for(lambda: all(server.channels.get(c).state == "ON" for c in down), 2, what="10 ON")
        await asyncio.sleep(0.5)
        end = time.time()
        status, report = await api(server, "GET", "/api/v1/reports/online",
                                   params={"since": str(start), "until": str(end), "group_by": "tier"})
        assert status == 200, report
        (tier1,) = [g for g in report["groups"] if g["group"] == 1]
        assert tier1["channels"] == 100
        # Expected from the outage as the server recorded it: 10 channels down for the time
        # between their OFF and ON events, out of 100 channels x the window.
        events = {c: await server.channels.events(channel_id=c, since=start) for c in down}
        downtime = sum(next(e.at for e in ev if e.state == "ON") - next(e.at for e in ev if e.state == "OFF")
                       for ev in events.values())
        expected = 1 - downtime / (100 * (end - start))
        assert tier1["online_ratio"] == pytest.approx(expected, abs=1e-6)
        assert 0.95 < tier1["online_ratio"] < 0.99
    finally:
        await fleet.stop()
    # The same numbers from the CLI, read from the database.
    await server.channels.flush()
    env = {"GB28181_DATA_DIR": str(server.config.data_dir), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "gb28181.cli", "report", "online", "--since",
                          str(start), "--until", str(end), "--json"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    cli = json.loads(out.stdout)
    (cli1,) = [g for g in cli["groups"] if g["group"] == 1]
    assert cli1["online_ratio"] == pytest.approx(tier1["online_ratio"], abs=1e-6)


async def test_tier_override_tree_and_live_queries(make_server):
    server = await make_server(catalog={"subscribe": False})
    fleet = nvr_fleet(server, channels=12, groups=True)
    await fleet.start()
    try:
        assert await fleet.wait_registered(10)
        await wait_for(lambda: len([c for c in server.channels.of_device(NVR) if c.kind == "channel"]) == 12,
                       10, what="12 cameras")
        cid = sorted(c.channel_id for c in server.channels.of_device(NVR) if c.kind == "channel")[0]
        status, body = await api(server, "PATCH", f"/api/v1/channels/{cid}", json={"tier": 1})
        assert status == 200 and body["tier"] == 1 and body["tier_locked"]
        status, body = await api(server, "PATCH", f"/api/v1/channels/{cid}", json={"tier": 7})
        assert status == 400
        # A re-sync keeps the operator's tier.
        status, result = await api(server, "POST", f"/api/v1/devices/{NVR}/sync")
        assert status == 200 and result["complete"], result
        assert server.channels.get(cid).tier == 1
        status, page = await api(server, "GET", "/api/v1/channels", params={"tier": "1"})
        assert [c["channel_id"] for c in page["channels"]] == [cid]
        for by in ("civil", "group"):
            status, tree = await api(server, "GET", "/api/v1/tree", params={"by": by})
            assert status == 200 and tree["tree"]["channels"] == 12, tree
        for what in ("info", "status", "config", "presets"):
            status, body = await api(server, "GET", f"/api/v1/devices/{NVR}/{what}")
            assert status == 200, (what, body)
        assert body["cmd_type"] == "PresetQuery"
    finally:
        await fleet.stop()


async def test_a_sync_asked_through_the_api_queries_the_catalog_even_when_registration_does_not(make_server):
    server = await make_server(catalog={"query_on_register": False, "subscribe": False})
    fleet = nvr_fleet(server, channels=4)
    await fleet.start()
    try:
        assert await fleet.wait_registered(10), fleet.summary()
        await asyncio.sleep(0.3)
        assert not server.channels.of_device(NVR)  # nothing asked on registration
        status, result = await api(server, "POST", f"/api/v1/devices/{NVR}/sync")
        assert status == 200, result
        assert result["items"] == 4 and result["complete"] and not result["error"]
        assert len(server.channels.of_device(NVR)) == 4
    finally:
        await fleet.stop()

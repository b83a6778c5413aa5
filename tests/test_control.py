"""PTZ, device control and device configuration end to end (GB/T 28181-2016 §9.3, A.2.3, A.3).

The HTTP API of a real server sends DeviceControl/DeviceConfig MESSAGEs over loopback SIP to
simulated devices, which decode them with their own state (simulators/ptz.py). The in-process
tests read that state directly (the fleet runs in the test's loop); the shipped-server test runs
`gb28181 serve` and `gb28181-sim` as processes and sees the camera only through the wire:
DeviceStatus answers carrying its PTZ position.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from gb28181 import ptz
from gb28181.server import GbServer
from simulators.fleet import Fleet, FleetConfig

from .conftest import TOKEN, wait_for, wait_until

IPC = "34020000001320000001"


def ipc_fleet(server: GbServer, **kw: Any) -> Fleet:
    base: dict[str, Any] = dict(server_port=server.sip_port, devices=1, first_id=IPC,
                                keepalive_interval=1.0, retry_min=0.3, register_rate=2000,
                                video_size="320x240", fps=25, gop=25)
    base.update(kw)
    return Fleet(FleetConfig(**base))


async def camera(server: GbServer, fleet: Fleet) -> str:
    await fleet.start()
    assert await fleet.wait_registered(10), fleet.summary()
    await wait_for(lambda: len(server.channels.of_device(IPC)) == 1, 10, what="the IPC's channel")
    return server.channels.of_device(IPC)[0].channel_id


async def call(server: GbServer, method: str, path: str, body: Any = None, *,
               raw: bytes | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        kw: dict[str, Any] = {"data": raw} if raw is not None else {"json": body}
        async with http.request(method, f"http://127.0.0.1:{server.http_port}{path}", **kw) as r:
            return r.status, await r.json()


def _turn(before: float, after: float) -> float:
    """Signed pan change in degrees, across the 0/360 wrap."""
    return (after - before + 180.0) % 360.0 - 180.0


# command -> the axes it moves and which way (+1 / -1); the others must stay put.
MOVES = {
    "up": {"tilt": 1}, "down": {"tilt": -1}, "left": {"pan": -1}, "right": {"pan": 1},
    "upleft": {"pan": -1, "tilt": 1}, "upright": {"pan": 1, "tilt": 1},
    "downleft": {"pan": -1, "tilt": -1}, "downright": {"pan": 1, "tilt": -1},
    "zoomin": {"zoom": 1}, "zoomout": {"zoom": -1},
    "focusnear": {"focus": -1}, "focusfar": {"focus": 1},
    "irisopen": {"iris": 1}, "irisclose": {"iris": -1},
}


async def test_every_ptz_command_reaches_the_camera_and_moves_it_the_right_way(make_server):
    server = await make_server()
    fleet = ipc_fleet(server)
    try:
        cid = await camera(server, fleet)
        controls = fleet.devices[IPC].controls
        for command, axes in MOVES.items():
            head = controls.head(cid)
            assert head is not None
            before = head.snapshot()
            sent = controls.counts["PTZCmd"]
            status, out = await call(server, "POST", f"/api/v1/channels/{cid}/ptz",
                                     {"command": command, "speed": 200})
            assert status == 200, out
            assert out["result"] == "delivered" and not out["confirmed"] and out["auto_stop"] == 60
            # What the camera decoded is what the API said it sent.
            await wait_for(lambda sent=sent: controls.counts["PTZCmd"] == sent + 1, 5, what=command)
            assert out["ptzcmd"] == [ptz.encode(head.motion if command in ptz.DIRECTIONS else head.lens)]
            assert head.moving
            await asyncio.sleep(0.3)
            status, out = await call(server, "POST", f"/api/v1/channels/{cid}/ptz", {"command": "stop"})
            lens = command.startswith(("focus", "iris"))  # the FI stop too (A.3.3)
            assert status == 200 and out["ptzcmd"] == ["A50F0100000000B5"] + ["A50F0140000000F5"] * lens, out
            await wait_for(lambda head=head: not head.moving, 5, what=f"{command} stopped")
            after = head.snapshot()
            await asyncio.sleep(0.2)
            assert head.snapshot()["pan"] == after["pan"] and head.snapshot()["zoom"] == after["zoom"]
            for axis in ("pan", "tilt", "zoom", "focus", "iris"):
                change = _turn(before[axis], after[axis]) if axis == "pan" else after[axis] - before[axis]
                way = axes.get(axis, 0)
                if way:
                    assert change * way > 0.5, (command, axis, before[axis], after[axis])
                else:
                    assert abs(change) < 1e-6, (command, axis, before[axis], after[axis])
        entries = [e for e in server.audit.recent if e["action"] == "ptz"]
        assert len(entries) == 2 * len(MOVES)
        assert entries[0]["who"] == "api-token" and entries[0]["target"] == cid
        assert entries[0]["command"] == "up" and entries[0]["result"] == "delivered"
    finally:
        await fleet.stop()


async def test_presets_cruise_scan_aux_home_and_drag_zoom(make_server):
    server = await make_server()
    fleet = ipc_fleet(server)
    try:
        cid = await camera(server, fleet)
        controls = fleet.devices[IPC].controls
        head = controls.head(cid)
        assert head is not None
        base = f"/api/v1/channels/{cid}"
        await call(server, "POST", f"{base}/ptz", {"command": "right", "speed": 255})
        await asyncio.sleep(0.3)
        await call(server, "POST", f"{base}/ptz", {"command": "stop"})
        await wait_for(lambda: not head.moving, 5, what="stop")
        status, out = await call(server, "POST", f"{base}/presets", {"action": "set", "index": 77})
        assert status == 200 and out["ptzcmd"] == [ptz.encode(ptz.Preset("set", 77))], out
        await wait_for(lambda: 77 in head.presets, 5, what="preset 77 set")
        where = head.snapshot()["pan"]
        # The device's own PresetQuery answer now lists it (through the live query API).
        status, out = await call(server, "GET", f"/api/v1/devices/{IPC}/presets?channel_id={cid}")
        listed = out["response"]["PresetList"]["Item"]
        assert status == 200 and "77" in [i["PresetID"] for i in listed]
        await call(server, "POST", f"{base}/ptz", {"command": "right", "speed": 255})
        await asyncio.sleep(0.2)
        status, out = await call(server, "POST", f"{base}/presets", {"action": "call", "index": 77})
        assert status == 200
        await wait_for(lambda: head.last_preset == 77, 5, what="preset 77 called")
        assert head.snapshot()["pan"] == where and not head.moving
        await call(server, "POST", f"{base}/presets", {"action": "delete", "index": 77})
        await wait_for(lambda: 77 not in head.presets, 5, what="preset 77 deleted")

        for body in ({"action": "add", "group": 2, "preset": 1}, {"action": "speed", "group": 2, "speed": 300},
                     {"action": "dwell", "group": 2, "dwell": 12}, {"action": "start", "group": 2}):
            status, out = await call(server, "POST", f"{base}/cruise", body)
            assert status == 200, out
        await wait_for(lambda: head.cruising == 2, 5, what="cruise started")
        assert (head.cruises[2].points, head.cruises[2].speed, head.cruises[2].dwell) == ([1], 300, 12)
        status, out = await call(server, "POST", f"{base}/cruise", {"action": "stop", "group": 2})
        assert status == 200 and out["ptzcmd"] == ["A50F0100000000B5"]
        await wait_for(lambda: head.cruising is None, 5, what="cruise stopped")

        for body in ({"action": "left", "group": 1}, {"action": "right", "group": 1},
                     {"action": "speed", "group": 1, "speed": 40}, {"action": "start", "group": 1}):
            status, out = await call(server, "POST", f"{base}/scan", body)
            assert status == 200, out
        await wait_for(lambda: head.scanning == 1, 5, what="scan started")
        assert head.scans[1].speed == 40 and head.scans[1].left is not None
        status, out = await call(server, "POST", f"{base}/aux", {"action": "on", "switch": 1})
        assert status == 200 and out["ptzcmd"] == ["A50F018C01000042"]
        await wait_for(lambda: head.aux.get(1) is True, 5, what="wiper on")

        # HomePosition is confirmed (§9.3.1): OK for a preset the camera has, ERROR otherwise.
        status, out = await call(server, "POST", f"{base}/home", {"enabled": True, "reset_time": 30, "preset": 1})
        assert status == 200 and out["result"] == "OK" and out["confirmed"], out
        assert head.home == {"preset": 1, "reset_time": 30}
        missing = next(p for p in range(2, 256) if p not in head.presets)
        status, out = await call(server, "POST", f"{base}/home", {"enabled": True, "preset": missing})
        assert status == 502 and out["result"] == "ERROR" and "ERROR" in out["error"], out
        assert server.audit.recent[-1]["action"] == "home-position"
        assert server.audit.recent[-1]["result"] == "ERROR"

        status, out = await call(server, "POST", f"{base}/dragzoom", {
            "direction": "in", "length": 1920, "width": 1080, "mid_x": 800, "mid_y": 400,
            "length_x": 200, "length_y": 100})
        assert status == 200 and out["result"] == "delivered", out
        await wait_for(lambda: controls.counts["DragZoomIn"] == 1, 5, what="DragZoomIn")
        status, out = await call(server, "POST", f"{base}/cruise", {"action": "add", "group": 2})
        assert status == 400 and "needs preset" in out["error"]
    finally:
        await fleet.stop()


async def test_a_move_nobody_stops_is_stopped_after_auto_stop(make_server):
    server = await make_server(ptz={"auto_stop": 0.6})
    fleet = ipc_fleet(server)
    try:
        cid = await camera(server, fleet)
        head = fleet.devices[IPC].controls.head(cid)
        assert head is not None
        started = time.monotonic()
        status, out = await call(server, "POST", f"/api/v1/channels/{cid}/ptz", {"command": "left"})
        assert status == 200 and out["auto_stop"] == 0.6
        await wait_for(lambda: head.moving, 5, what="the move")
        await wait_for(lambda: not head.moving, 5, what="the server's stop")
        assert time.monotonic() - started >= 0.5 and head.motion == ptz.STOP
        # Counted and audited once the device's 200 to the stop is in.
        await wait_for(lambda: server.control.auto_stops == 1, 5, what="the auto-stop counted")
        (entry,) = [e for e in server.audit.recent if e["action"] == "ptz-auto-stop"]
        assert entry["target"] == cid and entry["who"] == "server" and entry["result"] == "delivered"
        # A move that is stopped in time, and a cruise (meant to run), are left alone.
        await call(server, "POST", f"/api/v1/channels/{cid}/ptz", {"command": "up"})
        await call(server, "POST", f"/api/v1/channels/{cid}/ptz", {"command": "stop"})
        await call(server, "POST", f"/api/v1/channels/{cid}/ptz", {"command": "zoomin"})
        await call(server, "POST", f"/api/v1/channels/{cid}/cruise", {"action": "start", "group": 1})
        await asyncio.sleep(1.2)
        assert server.control.auto_stops == 1 and head.cruising == 1
    finally:
        await fleet.stop()


async def test_device_control_and_config_report_the_devices_result(make_server):
    server = await make_server()
    fleet = ipc_fleet(server)
    try:
        cid = await camera(server, fleet)
        controls = fleet.devices[IPC].controls

        async def control(body: dict) -> tuple[int, Any]:
            return await call(server, "POST", f"/api/v1/devices/{IPC}/control", body)

        async def status_of(target: str) -> dict:
            status, out = await call(server, "GET", f"/api/v1/devices/{IPC}/status?channel_id={target}")
            assert status == 200, out
            return out["response"]

        status, out = await control({"command": "record", "channel_id": cid})
        assert status == 200 and out["result"] == "OK" and out["confirmed"] and out["target"] == cid, out
        assert (await status_of(cid))["Record"] == "ON"
        status, out = await control({"command": "stoprecord", "channel_id": cid})
        assert status == 200 and out["result"] == "OK"
        assert (await status_of(cid))["Record"] == "OFF"
        status, out = await control({"command": "setguard"})
        assert status == 200 and out["result"] == "OK" and out["target"] == IPC
        duty = (await status_of(IPC))["Alarmstatus"]["Item"]
        assert {i["DutyStatus"] for i in duty} == {"ONDUTY"}
        assert (await control({"command": "resetguard"}))[1]["result"] == "OK"
        status, out = await control({"command": "resetalarm", "alarm_method": "2", "alarm_type": "1"})
        assert status == 200 and out["result"] == "OK"
        assert controls.confirmed[-1] == ("AlarmCmd", "ResetAlarm", IPC, "OK")
        # TeleBoot and IFameCmd get only the 200 (§9.3.1).
        status, out = await control({"command": "teleboot"})
        assert status == 200 and out["result"] == "delivered" and not out["confirmed"]
        status, out = await control({"command": "iframe", "channel_id": cid})
        assert status == 200 and out["result"] == "delivered"
        await wait_for(lambda: controls.counts["TeleBoot"] == 1 and controls.counts["IFameCmd"] == 1, 5,
                       what="TeleBoot and IFameCmd at the device")

        status, out = await call(server, "PUT", f"/api/v1/devices/{IPC}/config/basic",
                                 {"name": "Gate 3", "heartbeat_interval": 30, "heartbeat_count": 4})
        assert status == 200 and out["result"] == "OK" and out["cmd_type"] == "DeviceConfig", out
        device = server.registry.get(IPC)
        assert device is not None and device.name == "Gate 3"
        assert device.extra["heartbeat_interval"] == 30 and device.extra["heartbeat_count"] == 4
        status, out = await call(server, "GET", f"/api/v1/devices/{IPC}/config")
        assert out["response"]["BasicParam"]["HeartBeatInterval"] == "30"
        assert out["response"]["BasicParam"]["Name"] == "Gate 3"
        assert controls.confirmed[-1] == ("DeviceConfig", "BasicParam", IPC, "OK")

        audited = [e for e in server.audit.recent if e["action"] in ("device-control", "device-config")]
        assert [(e["command"] if "command" in e else "basic", e["result"]) for e in audited] == [
            ("record", "OK"), ("stoprecord", "OK"), ("setguard", "OK"), ("resetguard", "OK"),
            ("resetalarm", "OK"), ("teleboot", "delivered"), ("iframe", "delivered"), ("basic", "OK")]
        assert audited[0]["target"] == cid and audited[0]["who"] == "api-token" and audited[0]["source"]

        # A device that accepts the command but never confirms it: 504 after the wait.
        fleet.devices[IPC].cfg.query_mode = "silent"
        server.control.response_timeout = 0.5
        status, out = await control({"command": "record"})
        assert status == 504 and "no Response" in out["error"], out
        assert server.audit.recent[-1]["result"] == "failed"
    finally:
        await fleet.stop()


async def test_unknown_offline_and_bad_requests(make_server):
    server = await make_server()
    fleet = ipc_fleet(server)
    try:
        cid = await camera(server, fleet)
        ghost = "34020000001310099999"
        for path, body in ((f"/api/v1/channels/{ghost}/ptz", {"command": "up"}),
                           (f"/api/v1/channels/{ghost}/presets", {"action": "call", "index": 1}),
                           (f"/api/v1/channels/{ghost}/home", {"enabled": False})):
            status, out = await call(server, "POST", path, body)
            assert status == 404 and ghost in out["error"], (path, out)
        status, out = await call(server, "POST", "/api/v1/devices/34020000001320099999/control",
                                 {"command": "teleboot"})
        assert status == 404
        status, out = await call(server, "POST", f"/api/v1/devices/{IPC}/control",
                                 {"command": "record", "channel_id": ghost})
        assert status == 404 and ghost in out["error"]
        status, out = await call(server, "POST", f"/api/v1/devices/{IPC}/control",
                                 {"command": "teleboot", "channel_id": cid})
        assert status == 400 and "whole device" in out["error"]
        for path, body, reason in (
                (f"/api/v1/channels/{cid}/ptz", {"command": "spin"}, "command"),
                (f"/api/v1/channels/{cid}/ptz", {"command": "up", "speed": 256}, "speed"),
                (f"/api/v1/channels/{cid}/ptz", {"command": "up", "tilt": 3}, "tilt"),
                (f"/api/v1/channels/{cid}/presets", {"action": "call", "index": 0}, "index"),
                (f"/api/v1/channels/{cid}/presets", {"action": "goto", "index": 3}, "action"),
                (f"/api/v1/channels/{cid}/scan", {"action": "speed"}, "needs speed"),
                (f"/api/v1/channels/{cid}/dragzoom", {"direction": "in", "length": 100, "width": 100,
                                                      "mid_x": 150, "mid_y": 1, "length_x": 1,
                                                      "length_y": 1}, "mid_x"),
                (f"/api/v1/devices/{IPC}/control", {"command": "reboot"}, "command"),
                (f"/api/v1/devices/{IPC}/config/basic", {}, "at least one"),
                (f"/api/v1/devices/{IPC}/config/basic", {"expiration": 60}, "expiration")):
            status, out = await call(server, "POST" if "basic" not in path else "PUT", path, body)
            assert status == 400 and reason in out["error"], (path, body, out)
        status, out = await call(server, "POST", f"/api/v1/channels/{cid}/ptz", raw=b"{not json")
        assert status == 400 and "JSON" in out["error"]
        assert fleet.devices[IPC].controls.counts["PTZCmd"] == 0  # nothing bad reached the camera

        await fleet.stop(unregister=True)
        await wait_for(lambda: not server.registry.get(IPC).online, 5, what="the IPC offline")  # type: ignore[union-attr]
        for method, path, body in (("POST", f"/api/v1/channels/{cid}/ptz", {"command": "up"}),
                                   ("POST", f"/api/v1/channels/{cid}/presets", {"action": "set", "index": 2}),
                                   ("POST", f"/api/v1/devices/{IPC}/control", {"command": "record"}),
                                   ("PUT", f"/api/v1/devices/{IPC}/config/basic", {"name": "x"})):
            status, out = await call(server, method, path, body)
            assert status == 409 and "offline" in out["error"], (path, out)
    finally:
        await fleet.stop()


@pytest.mark.slow
@pytest.mark.parametrize("enabled", [True, False])
async def test_iframe_command_right_after_a_live_ack(make_server, enabled):
    server = await make_server(media={"iframe_after_ack": enabled})
    fleet = ipc_fleet(server)
    try:
        cid = await camera(server, fleet)
        controls = fleet.devices[IPC].controls
        # The state of the device's live call when each control arrives: ACKed already?
        seen: list[tuple[str, list[str]]] = []
        apply = controls.apply

        def watching(msg):
            seen.append((msg.device_id, [c.state for c in fleet.calls]))
            return apply(msg)

        controls.apply = watching  # type: ignore[method-assign]
        status, out = await call(server, "POST", f"/api/v1/channels/{cid}/play")
        assert status == 200, out
        if enabled:
            await wait_for(lambda: controls.counts["IFameCmd"] == 1, 5, what="IFameCmd after the ACK")
            assert seen == [(cid, ["confirmed"])]
        else:
            await asyncio.sleep(1.0)
            assert controls.counts["IFameCmd"] == 0 and seen == []
    finally:
        await fleet.stop()


@pytest.mark.slow
def test_shipped_server_moves_a_simulated_camera_over_the_wire(served, sims):
    server = served(GB28181_PTZ__AUTO_STOP="1.5", GB28181_MEDIA__WORKERS="1")
    sim = sims(server, "--devices", "1", "--first-id", IPC, "--keepalive-interval", "5")

    def channel() -> str | None:
        status, out = server.api(f"/api/v1/devices/{IPC}/channels")
        return out["channels"][0]["channel_id"] if status == 200 and out.get("channels") else None

    cid = wait_until(channel, 20, "the simulated IPC's channel", sim.exited)

    def position() -> dict:
        status, out = server.api(f"/api/v1/devices/{IPC}/status?channel_id={cid}")
        assert status == 200, out
        return out["response"]["PTZPosition"]

    start = position()
    assert start["Moving"] == "0"
    status, out = server.api(f"/api/v1/channels/{cid}/ptz", "POST", {"command": "up", "speed": 255})
    assert status == 200 and out["ptzcmd"] == ["A50F010800FF00BC"], out
    first = position()
    time.sleep(0.3)
    second = position()
    assert first["Moving"] == "1" and float(second["Tilt"]) > float(first["Tilt"]) >= float(start["Tilt"])
    status, out = server.api(f"/api/v1/channels/{cid}/ptz", "POST", {"command": "stop"})
    assert status == 200
    stopped = position()
    time.sleep(0.3)
    assert stopped["Moving"] == "0" and position()["Tilt"] == stopped["Tilt"]
    # Nobody stops this one: the server does, after ptz.auto_stop.
    server.api(f"/api/v1/channels/{cid}/ptz", "POST", {"command": "zoomin", "speed": 255})
    assert position()["Moving"] == "1"
    wait_until(lambda: position()["Moving"] == "0", 10, "the server's auto-stop", sim.exited)
    status, out = server.api("/api/v1/audit")
    assert "ptz-auto-stop" in [e["action"] for e in out["entries"]]
    status, out = server.api(f"/api/v1/devices/{IPC}/control", "POST", {"command": "record", "channel_id": cid})
    assert status == 200 and out["result"] == "OK", out
    assert server.api(f"/api/v1/devices/{IPC}/status?channel_id={cid}")[1]["response"]["Record"] == "ON"
    presets = [int(i["PresetID"]) for i in server.api(
        f"/api/v1/devices/{IPC}/presets?channel_id={cid}")[1]["response"]["PresetList"]["Item"]]
    status, out = server.api(f"/api/v1/channels/{cid}/home", "POST", {"enabled": True, "preset": presets[0]})
    assert (status, out["result"]) == (200, "OK"), out
    missing = next(p for p in range(1, 256) if p not in presets)
    status, out = server.api(f"/api/v1/channels/{cid}/home", "POST", {"enabled": True, "preset": missing})
    assert (status, out["result"]) == (502, "ERROR"), out
    assert not server.error_lines()

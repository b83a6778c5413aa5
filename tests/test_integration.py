"""End to end on loopback: the real server and a fleet of simulated devices over real sockets."""

from __future__ import annotations

import aiohttp
import pytest

from gb28181.server import GbServer
from simulators.fleet import Fleet, FleetConfig

from .conftest import TOKEN, server_config, wait_for

pytestmark = pytest.mark.slow


def fleet_config(server: GbServer, **kw) -> FleetConfig:
    base = dict(server_port=server.sip_port, keepalive_interval=0.5, retry_min=0.3,
                register_rate=2000, request_timeout=None)
    base.update(kw)
    return FleetConfig(**base)


async def api_devices(server: GbServer, status: str | None = None) -> dict:
    params = {"limit": "1000"}
    if status:
        params["status"] = status
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        async with http.get(f"http://127.0.0.1:{server.http_port}/api/v1/devices", params=params) as r:
            assert r.status == 200, await r.text()
            return await r.json()


async def count(server: GbServer, status: str) -> int:
    return (await api_devices(server, status))["total"]


async def test_200_devices_online_then_offline_when_the_simulator_stops(make_server):
    server = await make_server()
    fleet = Fleet(fleet_config(server, devices=200))
    await fleet.start()
    try:
        assert await fleet.wait_registered(20), fleet.summary()
        await wait_for(lambda: _eq(count(server, "online"), 200), 10, what="200 online via the API")
        listed = await api_devices(server)
        assert listed["total"] == 200
        assert {d["status"] for d in listed["devices"]} == {"online"}
        # The simulator answered the DeviceInfo query the server sent after registration.
        await wait_for(lambda: all(d.manufacturer == "Simulator" for d in server.registry), 10,
                       what="DeviceInfo of every device")
    finally:
        await fleet.stop()
    # 0.5 s x 3 keepalives: everything is offline about 1.5 s after the last keepalive.
    await wait_for(lambda: _eq(count(server, "offline"), 200), 6, what="200 offline via the API")
    events = await server.registry.status_events(device_id="34020000001320000001")
    assert [(e.online, e.reason) for e in events] == [(True, "register"), (False, "keepalive-timeout")]


async def _eq(coro, value) -> bool:
    return (await coro) == value


async def test_restart_keeps_devices_and_they_return_on_their_next_keepalive(tmp_path):
    cfg = server_config(tmp_path)
    server = GbServer(cfg)
    await server.start()
    fleet = Fleet(fleet_config(server, devices=200))
    await fleet.start()
    server2 = None
    try:
        assert await fleet.wait_registered(20), fleet.summary()
        await wait_for(lambda: server.registry.counts() == (200, 200), 10, what="200 online")
        port = server.sip_port
        # A link outage long enough for the server to call everyone offline, and a server
        # restart in the middle of it.
        fleet.pause()
        await server.stop()
        import asyncio
        await asyncio.sleep(2.0)
        server2 = GbServer(server_config(tmp_path, sip={"port": port}))
        await server2.start()
        listed = await api_devices(server2)
        assert listed["total"] == 200, "devices must survive a restart"
        assert await count(server2, "offline") == 200
        fleet.resume()
        await wait_for(lambda: _eq(count(server2, "online"), 200), 10,
                       what="200 online again after their keepalives")
        assert server2.counters.register_requests == 0, "devices came back without re-registering"
        assert server2.counters.keepalives >= 200
    finally:
        await fleet.stop()
        if server2 is not None:
            await server2.stop()


@pytest.mark.parametrize("mode", ["tcp", "per-device-ports"])
async def test_tcp_and_one_port_per_device(make_server, mode):
    server = await make_server()
    kw = {"transport": "tcp"} if mode == "tcp" else {"per_device_ports": True}
    fleet = Fleet(fleet_config(server, devices=50, **kw))
    await fleet.start()
    try:
        assert await fleet.wait_registered(20), fleet.summary()
        await wait_for(lambda: server.registry.counts() == (50, 50), 10, what="50 online")
        await wait_for(lambda: fleet.summary()["keepalives_ok"] >= 50, 10, what="keepalives")
        ports = {d.port for d in server.registry}
        transports = {d.transport for d in server.registry}
        if mode == "tcp":
            assert transports == {"tcp"}
        else:
            assert len(ports) == 50, "each device is keyed by its ID and keeps its own address"
        # The server reaches devices at their stored address: DeviceInfo came back.
        await wait_for(lambda: all(d.name for d in server.registry), 10, what="DeviceInfo answers")
    finally:
        await fleet.stop()


async def test_nvr_with_channels_and_qop(make_server):
    server = await make_server(auth={"qop": True})
    fleet = Fleet(fleet_config(server, devices=5, nvr=True, channels=8,
                               first_id="34020000001180000001"))
    await fleet.start()
    try:
        assert await fleet.wait_registered(10), fleet.summary()
        await wait_for(lambda: all(d.extra.get("channels") == 8 for d in server.registry), 10,
                       what="NVR DeviceInfo with 8 channels")
        assert {d.kind for d in server.registry} == {"nvr"}
    finally:
        await fleet.stop()


async def test_unregister_marks_devices_offline(make_server):
    server = await make_server()
    fleet = Fleet(fleet_config(server, devices=10))
    await fleet.start()
    assert await fleet.wait_registered(10)
    await wait_for(lambda: server.registry.counts() == (10, 10), 5, what="10 online")
    await fleet.stop(unregister=True)
    await wait_for(lambda: server.registry.counts() == (10, 0), 5, what="10 offline")
    events = await server.registry.status_events(device_id="34020000001320000001")
    assert events[-1].reason == "unregister"

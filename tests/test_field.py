"""Devices as they are deployed, in process against simulated fleets over real sockets: NVRs
that choose their own SSRCs, devices registered over TCP, devices that report their own
heartbeat, devices that never answer queries, a crowd registering at once, and a server bound
to every interface that must tell each device an address it can reach."""

from __future__ import annotations

import asyncio
import time

import pytest

from gb28181.server import GbServer
from gb28181.sip.netroute import LocalAddresses, is_loopback
from simulators.fleet import Fleet, FleetConfig

from .conftest import wait_for

pytestmark = pytest.mark.slow

NVR = "34020000001180000001"
IPC = "34020000001320000001"


def fleet_of(server: GbServer, **kw) -> Fleet:
    base = dict(server_port=server.sip_port, devices=1, first_id=IPC, keepalive_interval=1.0,
                retry_min=0.3, register_rate=2000, video_size="160x120", fps=10, gop=10)
    base.update(kw)
    return Fleet(FleetConfig(**base))


@pytest.mark.parametrize("transport", ["udp", "tcp-passive", "tcp-active"])
async def test_concurrent_plays_of_one_nvr_that_picks_its_own_ssrcs_never_swap(make_server, transport):
    server = await make_server(media={"tcp_port_range": None} if transport == "tcp-active" else {})
    fleet = fleet_of(server, first_id=NVR, nvr=True, channels=4, own_ssrc=True)
    await fleet.start()
    try:
        assert await fleet.wait_registered(10), fleet.summary()
        await wait_for(lambda: len(server.channels.of_device(NVR)) == 4, 10, what="the NVR's catalog")
        channels = [c.channel_id for c in server.channels.of_device(NVR)]
        lives = await asyncio.gather(*(server.streams.play(c, transport) for c in channels))
        assert await fleet.wait_streams(4, 10)
        by_channel = {s.channel_id: s for s in fleet.streams}
        for live in lives:
            sim = by_channel[live.channel_id]
            session = live.session
            assert session is not None and session.answer is not None
            # The device answered with its own y=, and that is what reaches this stream ...
            assert session.answer.ssrc_value == sim.ssrc != int(session.ssrc)
            on_node = server.nodes.local.node.streams[live.channel_id]
            assert sim.ssrc in on_node.handle.ssrcs
            # ... from the device's socket for this very channel, never another's.
            assert on_node.handle.peer[1] == sim.local_port, (live.channel_id, on_node.handle.peer)
            assert session.leg.peer == on_node.handle.peer
            await wait_for(lambda n=on_node: n.ingest.stats.frames > 0, 5, what="frames on the stream")
    finally:
        await fleet.stop()


async def test_requests_to_a_tcp_device_reuse_its_connection_then_go_to_its_contact(make_server):
    server = await make_server()
    fleet = fleet_of(server, transport="tcp")
    await fleet.start()
    try:
        assert await fleet.wait_registered(10)
        device = server.registry.get(IPC)
        assert device.transport == "tcp"
        await wait_for(lambda: len(server.channels.of_device(IPC)) == 1, 10, what="the catalog")
        sim = fleet.devices[IPC]
        # Everything so far (queries, the catalog, the subscription) came over the device's
        # own connection: the server opened none.
        assert server.endpoint.stats.tcp_connections == 1
        assert (device.host, device.port) in server.endpoint._tcp_conns
        # The connection breaks (a NAT timeout, a restart of the device's TCP stack) ...
        server.endpoint._tcp_conns[(device.host, device.port)].close()
        await wait_for(lambda: not server.endpoint._tcp_conns, 5, what="the connection to close")
        # ... and the next request goes to the Contact, where the device listens, not to the
        # ephemeral port its old connection came from.
        info = await server.queries.query(device, "DeviceInfo", timeout=5)
        assert info.text("Result") == "OK"
        assert (sim.ep.advertised_host, sim.ep.port) in server.endpoint._tcp_conns
        # Our Contact says TCP, so the device's in-dialog requests come over TCP too.
        live = await server.streams.play(fleet.devices[IPC].channels[0].channel_id, "udp")
        (call,) = fleet.calls
        assert call.dialog.remote_target.endswith(";transport=tcp")
        assert live.session is not None and live.session.sip_transport == "tcp"
    finally:
        await fleet.stop()


async def test_a_devices_own_heartbeat_sets_its_offline_deadline(make_server):
    # The server expects 0.5 s x 3; the device says (BasicParam) 2 s x 2.
    server = await make_server(registration={"query_basic_param": True})
    fleet = fleet_of(server, keepalive_interval=2.0, keepalive_misses=2)
    await fleet.start()
    try:
        assert await fleet.wait_registered(10)
        device = server.registry.get(IPC)
        await wait_for(lambda: device.extra.get("heartbeat_interval") == 2, 10, what="BasicParam")
        assert device.extra["heartbeat_count"] == 2
        assert server.presence.deadline(device) == pytest.approx(
            max(device.keepalive_at, device.registered_at) + 4.0)
        fleet.pause()
        paused = time.monotonic()
        await asyncio.sleep(1.7)  # the configured 1.5 s would have taken it offline by now
        assert device.online
        await wait_for(lambda: not device.online, 8, what="offline after 2 x 2 s")
        assert time.monotonic() - paused <= 8
    finally:
        await fleet.stop()


async def test_silent_devices_do_not_hold_query_slots_that_others_need(make_server):
    server = await make_server(registration={"query_device_info": True},
                               catalog={"sync_rate": 0, "first_part": 30, "subscribe": False})
    silent = fleet_of(server, devices=100, first_id="34020000001320000101", query_mode="silent")
    await silent.start()
    answering = fleet_of(server, devices=3, first_id="34020000001320000001")
    try:
        assert await silent.wait_registered(10)
        await answering.start()
        assert await answering.wait_registered(10)
        # 100 devices each hold a catalog collection open for 30 s; the three that answer are
        # synced at once all the same.
        for device_id in answering.devices:
            await wait_for(lambda d=device_id: len(server.channels.of_device(d)) == 1, 8,
                           what=f"the catalog of {device_id}")
        assert not any(server.channels.of_device(d) for d in silent.devices)
    finally:
        await answering.stop()
        await silent.stop()


async def test_post_registration_queries_are_paced(make_server):
    server = await make_server(registration={"query_device_info": True},
                               catalog={"sync_rate": 10, "query_on_register": False})
    fleet = fleet_of(server, devices=40, register_rate=5000)
    await fleet.start()
    try:
        assert await fleet.wait_registered(10)
        started = time.monotonic()

        def queried() -> int:
            return sum(1 for d in fleet.devices.values() if d.stats.queries_answered)
        await asyncio.sleep(1.0)
        # 10 syncs a second, whatever the crowd; a loaded machine can only be slower.
        assert queried() <= 10 * (time.monotonic() - started) + 11
        await wait_for(lambda: queried() == 40, 15, what="every device queried in the end")
    finally:
        await fleet.stop()


def _own_address() -> str | None:
    addr = LocalAddresses("0.0.0.0").default
    return None if is_loopback(addr) else addr


async def test_a_wildcard_bind_tells_each_device_an_address_it_can_reach(tmp_path):
    own = _own_address()
    if own is None:
        pytest.skip("this host has no address but loopback")
    from .conftest import server_config
    server = GbServer(server_config(tmp_path, sip={"host": "0.0.0.0", "port": 0},
                                    media={"host": "0.0.0.0", "rtp_port": 0}))
    await server.start()
    lan = fleet_of(server, bind_host=own, server_host=own, first_id="34020000001320000001")
    local = fleet_of(server, first_id="34020000001320000002")
    await lan.start()
    await local.start()
    try:
        assert await lan.wait_registered(10) and await local.wait_registered(10)
        assert server.addresses()["sip_address"] == own
        for fleet, expected in ((lan, own), (local, "127.0.0.1")):
            (device_id,) = fleet.devices
            await wait_for(lambda d=device_id: server.channels.of_device(d), 10, what="catalog")
            await server.streams.play(server.channels.of_device(device_id)[0].channel_id, "udp")
            (call,) = fleet.calls
            # Contact (the BYE's target), SDP c= (where RTP goes): never loopback for the LAN.
            assert f"@{expected}:" in call.dialog.remote_target
            assert call.stream.remote[0] == expected
    finally:
        await lan.stop()
        await local.stop()
        await server.stop()

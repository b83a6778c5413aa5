"""The registrar and keepalive handling over a real UDP socket, one crafted message at a time."""

from __future__ import annotations

import asyncio
import os
import re

import pytest

from registry.models import Device
from simulators.fleet import Fleet, FleetConfig

from .conftest import wait_for
from .sipclient import RawSip

DEV = "34020000001320000001"


async def test_challenge_then_200_with_date_and_no_100_trying(make_server):
    server = await make_server()
    async with RawSip(server.sip_port) as dev:
        dev.send(dev.register_bytes())
        first = await dev.recv()
        assert first.status == 401, "a REGISTER never gets 100 Trying (Dahua firmware fails on it)"
        challenge = first.get("www-authenticate")
        assert challenge.startswith("Digest ") and 'realm="3402000000"' in challenge
        assert "nonce=" in challenge and "algorithm=MD5" in challenge
        dev.send(dev.register_bytes(authorization=dev.answer(first)))
        ok = await dev.recv()
        assert ok.status == 200
        assert ok.get("expires") == "3600"
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}", ok.get("date")), ok.get("date")
        assert ok.to_tag and ok.from_tag == dev.tag and ok.call_id == dev.call_id
        assert f"rport={dev.port}" in ok.get("via") and "received=127.0.0.1" in ok.get("via")
        assert await dev.no_more(0.2) == []
        assert [r.method for r in dev.requests] == ["MESSAGE"], "then a DeviceInfo query"
    device = server.registry.get(DEV)
    assert device is not None and device.online and device.port == dev.port and device.kind == "ipc"


async def test_wrong_password_then_lockout(make_server):
    server = await make_server(auth={"max_failures": 3, "lockout_seconds": 60})
    async with RawSip(server.sip_port) as dev:
        for _ in range(3):
            resp = await dev.register(password="wrong")
            assert resp.status == 403 and "wrong password" in resp.reason
        resp = await dev.register(password="12345678")
        assert resp.status == 403 and "too many wrong passwords" in resp.reason
    # Another source address is not locked out by someone else's guessing.
    async with RawSip(server.sip_port, local_host="127.0.0.2") as other:
        assert (await other.register()).status == 200
    assert server.counters.lockouts == 1
    assert server.counters.auth_failures["wrong-password"] == 3


async def test_replayed_authorization_is_refused_as_stale(make_server):
    server = await make_server()
    async with RawSip(server.sip_port) as dev:
        dev.send(dev.register_bytes())
        challenge = await dev.recv()
        auth = dev.answer(challenge)
        dev.send(dev.register_bytes(authorization=auth))
        assert (await dev.recv()).status == 200
        # The same Authorization again (a captured packet, new branch and CSeq): refused.
        dev.send(dev.register_bytes(authorization=auth))
        replay = await dev.recv()
        assert replay.status == 401 and "stale=true" in replay.get("www-authenticate")
    assert server.counters.register_ok == 1


async def test_retransmitted_register_is_absorbed_not_replayed(make_server):
    server = await make_server()
    async with RawSip(server.sip_port) as dev:
        dev.send(dev.register_bytes())
        challenge = await dev.recv()
        data = dev.register_bytes(authorization=dev.answer(challenge), branch="z9hG4bKretrans1")
        dev.send(data)
        first = await dev.recv()
        dev.send(data)  # a UDP retransmission: same branch, Call-ID and CSeq
        second = await dev.recv()
    assert first.status == second.status == 200
    assert first.serialize() == second.serialize()
    assert server.counters.register_ok == 1


async def test_expired_nonce_is_stale_not_a_wrong_password(make_server):
    # TTL long enough that the fresh nonce of the stale 401 is still good under a loaded CI.
    server = await make_server(auth={"nonce_ttl": 1.0})
    async with RawSip(server.sip_port) as dev:
        dev.send(dev.register_bytes())
        challenge = await dev.recv()
        await asyncio.sleep(1.2)
        dev.send(dev.register_bytes(authorization=dev.answer(challenge)))
        stale = await dev.recv()
        assert stale.status == 401 and "stale=true" in stale.get("www-authenticate")
        dev.send(dev.register_bytes(authorization=dev.answer(stale)))
        assert (await dev.recv()).status == 200
    assert server.counters.lockouts == 0 and server.counters.auth_failures["wrong-password"] == 0


@pytest.mark.parametrize("device_id,reason", [
    ("3402000000132000001", "20 digits"),
    ("3402000000132000000X", "non-digits"),
    ("34020000003000000001", "cannot register"),
])
async def test_invalid_ids_are_refused(make_server, device_id, reason):
    server = await make_server()
    async with RawSip(server.sip_port, device_id=device_id) as dev:
        dev.send(dev.register_bytes())
        resp = await dev.recv()
    assert resp.status == 403 and reason in resp.reason
    assert len(server.registry) == 0


async def test_unknown_devices_refused_by_policy_and_per_device_passwords(make_server):
    server = await make_server(auth={"unknown_devices": "refuse"})
    async with RawSip(server.sip_port) as dev:
        dev.send(dev.register_bytes())
        resp = await dev.recv()
        assert resp.status == 403 and "unknown device" in resp.reason
        server.registry.add(Device(device_id=DEV, kind="ipc", password="own-secret"))
        assert (await dev.register(password="12345678")).status == 403
        assert (await dev.register(password="own-secret")).status == 200


async def test_expires_rules_and_unregister(make_server):
    server = await make_server()
    async with RawSip(server.sip_port) as dev:
        dev.send(dev.register_bytes(expires=30))
        brief = await dev.recv()
        assert brief.status == 423 and brief.get("min-expires") == "60"
        dev.send(dev.register_bytes(expires="soon"))
        assert (await dev.recv()).status == 400
        ok = await dev.register(expires=10**7)
        assert ok.status == 200 and ok.get("expires") == "86400"
        dev.send(dev.keepalive_bytes())
        assert (await dev.recv()).status == 200
        bye = await dev.register(expires=0)
        assert bye.status == 200 and bye.get("expires") == "0"
        device = server.registry.get(DEV)
        assert not device.online and device.expires_at == 0
        dev.send(dev.keepalive_bytes())
        refused = await dev.recv()
        assert refused.status == 403 and "REGISTER first" in refused.reason


async def test_keepalive_from_unknown_device_and_bad_bodies(make_server):
    server = await make_server()
    async with RawSip(server.sip_port) as dev:
        dev.send(dev.keepalive_bytes())
        resp = await dev.recv()
        assert resp.status == 404 and "REGISTER first" in resp.reason
        assert (await dev.register()).status == 200
        dev.send(dev.message_bytes("<Notify><CmdType>Keepalive</CmdType>", device_id=DEV))
        assert (await dev.recv()).status == 400
        dev.send(dev.message_bytes('<!DOCTYPE x [<!ENTITY a "aaaa">]><Notify><CmdType>&a;</CmdType></Notify>'))
        assert (await dev.recv()).status == 400
        dev.send(dev.message_bytes("hello", content_type="text/plain"))
        assert (await dev.recv()).status == 415
        # A Hik-style keepalive: LF-only body, UTF-8 declared, empty Info, no Status.
        body = ('<?xml version="1.0" encoding="UTF-8"?>\n<Notify>\n<CmdType>Keepalive</CmdType>\n'
                f"<SN>43</SN>\n<DeviceID>{DEV}</DeviceID>\n<Info>\n</Info>\n</Notify>\n")
        dev.send(dev.message_bytes(body))
        assert (await dev.recv()).status == 200
    assert server.counters.keepalives == 1


async def test_garbage_oversize_and_flood_leave_the_server_serving(make_server):
    server = await make_server(sip={"max_message_size": 4096})
    async with RawSip(server.sip_port) as dev:
        # Broken but answerable: 400 naming the fault.
        bad = dev.register_bytes().replace(b"CSeq: 1 REGISTER", b"CSeq: one REGISTER")
        dev.send(bad)
        raw = await asyncio.wait_for(dev.proto.queue.get(), 2)
        status_line = raw.split(b"\r\n", 1)[0]
        assert status_line.startswith(b"SIP/2.0 400 ") and b"CSeq" in status_line, status_line
        # Unanswerable garbage and an oversized message: dropped and counted.
        for blob in (b"\x00\xff" * 50, b"GARBAGE\r\n\r\n", os.urandom(1200),
                     dev.register_bytes()[:-4] + b"X-Pad: " + b"a" * 5000 + b"\r\n\r\n"):
            dev.send(blob)
        # A flood: 3000 REGISTERs without credentials from one socket, as fast as it goes.
        for n in range(3000):
            dev.send(dev.register_bytes(device_id=f"3402000000132{n:07d}"))
        await asyncio.sleep(0.5)
        while not dev.proto.queue.empty():
            dev.proto.queue.get_nowait()
        assert (await dev.register()).status == 200
    assert server.endpoint.stats.parse_errors >= 4
    # The flood created no devices: nobody authenticated.
    assert len(server.registry) == 1
    fleet = Fleet(FleetConfig(server_port=server.sip_port, devices=20, keepalive_interval=0.5,
                              first_id="34020000001320000100", retry_min=0.2))
    await fleet.start()
    try:
        assert await fleet.wait_registered(10), fleet.summary()
    finally:
        await fleet.stop()


async def test_options_and_unsupported_methods(make_server):
    server = await make_server()
    async with RawSip(server.sip_port) as dev:
        raw = dev.register_bytes().replace(b"REGISTER sip:", b"OPTIONS sip:").replace(
            b"REGISTER\r\n", b"OPTIONS\r\n")
        dev.send(raw)
        assert (await dev.recv()).status == 200
        raw = dev.register_bytes().replace(b"REGISTER sip:", b"PUBLISH sip:").replace(
            b"REGISTER\r\n", b"PUBLISH\r\n")
        dev.send(raw)
        resp = await dev.recv()
        assert resp.status == 405 and "Allow" in resp


async def test_keepalive_refreshes_the_address_after_nat_rebinding(make_server):
    server = await make_server()
    async with RawSip(server.sip_port) as dev:
        assert (await dev.register()).status == 200
    async with RawSip(server.sip_port) as moved:  # same device, new source port
        moved.send(moved.keepalive_bytes())
        assert (await moved.recv()).status == 200
        await wait_for(lambda: server.registry.get(DEV).port == moved.port, 2, what="new port")

"""Cascade on the wire: this server as a lower platform, against a raw UDP socket playing the
upper platform (GB/T 28181-2016 §9.1, §9.5, §9.6, Annex J, Annex N), on both event loops.

The raw upper checks the exact requests we send it (REGISTER answering a qop challenge,
keepalives, catalog parts one at a time) and sends what a good upper never would.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from gb28181 import manscdp
from gb28181.sip.auth import DigestServer
from gb28181.sip.message import SipRequest
from simulators.fleet import Fleet, FleetConfig

from .conftest import wait_for
from .sipclient import RawSip

LOWER = "34020100002000000001"
UPPER = "34020000002000000001"
NVR = "34020100001180000001"


async def lower_with_upper(make_server, raw: RawSip, **upstream):
    return await make_server(
        server={"id": LOWER, "domain": LOWER[:10]},
        upstreams=[{"server_id": UPPER, "host": "127.0.0.1", "port": raw.port, "password": "secret-pw",
                    "keepalive_interval": 0.5, "retry_min": 0.2, "retry_max": 0.5, **upstream}])


async def accept_registration(raw: RawSip, digest: DigestServer) -> SipRequest:
    """Challenge the lower's REGISTER with qop=auth and accept the answer; the answered REGISTER."""
    first = await raw.request("REGISTER", timeout=5)
    raw.reply(first, 401, "Unauthorized", to_tag="t1",
              headers={"WWW-Authenticate": digest.challenge(time.time())})
    second = await raw.request("REGISTER", timeout=5)
    result = digest.verify(second.get("authorization") or "", method="REGISTER", password="secret-pw",
                           now=time.time(), username=LOWER)
    assert result.ok, result.reason
    raw.reply(second, 200, "OK", to_tag="t1", headers={"Expires": "3600"})
    return second


def query(raw: RawSip, cmd: str, sn: int, device_id: str = LOWER, root: str = "Query", fields=()) -> bytes:
    body = manscdp.build(root, cmd, sn, device_id, list(fields), encoding="UTF-8").decode()
    return raw.message_bytes(body, device_id=UPPER)


async def test_registers_with_qop_digest_and_keeps_alive(make_server):
    async with RawSip(0, device_id=UPPER, server_id=LOWER) as raw:
        server = await lower_with_upper(make_server, raw)
        raw.server = ("127.0.0.1", server.sip_port)
        digest = DigestServer("3402000000", qop=True)
        register = await accept_registration(raw, digest)
        auth = register.get("authorization") or ""
        assert "qop=auth" in auth and "nc=00000001" in auth and 'username="34020100002000000001"' in auth
        assert register.uri == f"sip:{UPPER}@127.0.0.1:{raw.port}"
        assert f"sip:{LOWER}@" in register.headers["from"][0] and f"sip:{LOWER}@" in register.headers["to"][0]
        assert register.get("expires") == "3600"
        keepalive = await raw.request("MESSAGE", timeout=5)
        msg = manscdp.parse(keepalive.body)
        assert (msg.root, msg.cmd_type, msg.device_id, msg.text("Status")) == ("Notify", "Keepalive", LOWER, "OK")
        raw.reply(keepalive, 200)
        await wait_for(lambda: server.cascade.uplinks[UPPER].registered, 5, what="registered")
        # A refused keepalive (the upper forgot us) makes it register again, same Call-ID.
        keepalive = await raw.request("MESSAGE", timeout=5)
        raw.reply(keepalive, 404, "Not Found")
        again = await raw.request("REGISTER", timeout=5)
        assert again.call_id == register.call_id and again.cseq[0] > register.cseq[0]


async def test_wrong_password_is_reported_and_retried_with_back_off(make_server):
    async with RawSip(0, device_id=UPPER, server_id=LOWER) as raw:
        server = await lower_with_upper(make_server, raw)
        raw.server = ("127.0.0.1", server.sip_port)
        digest = DigestServer("3402000000")
        times = []
        for _ in range(3):
            first = await raw.request("REGISTER", timeout=5)
            times.append(time.monotonic())
            raw.reply(first, 401, headers={"WWW-Authenticate": digest.challenge(time.time())}, to_tag="x")
            second = await raw.request("REGISTER", timeout=5)
            raw.reply(second, 401, headers={"WWW-Authenticate": digest.challenge(time.time())}, to_tag="x")
        uplink = server.cascade.uplinks[UPPER]
        await wait_for(lambda: uplink.failures >= 3, 5, what="the third failure")
        assert uplink.status == "failed" and "wrong password" in uplink.reason
        assert uplink.failures >= 2 and uplink.registrations == 0
        assert times[2] - times[1] >= 0.15  # backed off (retry_min 0.2, jittered)


async def test_catalog_parts_go_one_at_a_time_and_answers_name_us(make_server):
    async with RawSip(0, device_id=UPPER, server_id=LOWER) as raw:
        server = await lower_with_upper(make_server, raw, catalog_items_per_message=3)
        raw.server = ("127.0.0.1", server.sip_port)
        fleet = Fleet(FleetConfig(server_port=server.sip_port, server_id=LOWER, devices=1, nvr=True,
                                  channels=4, first_id=NVR, groups=True, keepalive_interval=0.5,
                                  retry_min=0.3, register_rate=2000))
        await fleet.start()
        try:
            await accept_registration(raw, DigestServer("3402000000"))
            await wait_for(lambda: len([c for c in server.channels if c.kind == "channel"]) == 4, 10,
                           what="the NVR's catalog")
            raw.send(query(raw, "Catalog", 77))
            assert (await raw.recv()).status == 200
            parts, items = [], []
            while not parts or len(items) < int(parts[0].text("SumNum")):
                part = await raw.request("MESSAGE", timeout=3)
                msg = manscdp.parse(part.body)
                if msg.cmd_type == "Keepalive":
                    raw.reply(part, 200)
                    continue
                assert (msg.root, msg.cmd_type, msg.sn, msg.device_id) == ("Response", "Catalog", 77, LOWER)
                parts.append(msg)
                items += msg.items("DeviceList")
                # Annex N: the next part waits for this one's 200 (held here for 0.6 s).
                held_until = time.monotonic() + 0.6
                while (left := held_until - time.monotonic()) > 0:
                    try:
                        other = await raw.request("MESSAGE", timeout=left)
                    except TimeoutError:
                        break
                    if other.call_id == part.call_id:
                        continue  # its retransmission (RFC 3261 Timer E)
                    assert manscdp.parse(other.body).cmd_type == "Keepalive", "a part before our 200"
                    raw.reply(other, 200)
                raw.reply(part, 200)
            sum_num = int(parts[0].text("SumNum"))
            assert sum_num == len(items) == len({i["DeviceID"] for i in items}) and len(parts) == -(-sum_num // 3)
            cameras = [i for i in items if len(i["DeviceID"]) == 20 and i["DeviceID"][10:13] == "131"]
            assert len(cameras) == 4 and all(i["ParentID"].startswith(LOWER) for i in cameras)
            # DeviceInfo and DeviceStatus of the platform itself.
            for cmd in ("DeviceInfo", "DeviceStatus"):
                raw.send(query(raw, cmd, 78))
                assert (await raw.recv()).status == 200
                answer = await raw.request("MESSAGE", timeout=3)
                while manscdp.parse(answer.body).cmd_type == "Keepalive":
                    raw.reply(answer, 200)
                    answer = await raw.request("MESSAGE", timeout=3)
                raw.reply(answer, 200)
                msg = manscdp.parse(answer.body)
                assert (msg.cmd_type, msg.sn, msg.device_id, msg.text("Result")) == (cmd, 78, LOWER, "OK")
                if cmd == "DeviceInfo":
                    assert msg.text("Model") == "platform" and msg.text("Channel") == "4"
        finally:
            await fleet.stop()


async def test_bad_requests_from_the_upper_get_clear_errors(make_server):
    async with RawSip(0, device_id=UPPER, server_id=LOWER) as raw:
        server = await lower_with_upper(make_server, raw)
        raw.server = ("127.0.0.1", server.sip_port)
        await accept_registration(raw, DigestServer("3402000000"))
        raw.send(raw.message_bytes("<Query><CmdType>Catalog", device_id=UPPER))
        bad = await raw.recv()
        assert bad.status == 400
        raw.send(raw.message_bytes("hello", device_id=UPPER, content_type="text/plain"))
        assert (await raw.recv()).status == 415
        # A control for a channel we do not share (or have): 404 with the reason.
        raw.send(query(raw, "DeviceControl", 5, "34020100001310000099", root="Control",
                       fields=[("PTZCmd", "A50F0100000000B5")]))
        refused = await raw.recv()
        assert refused.status == 404 and "not shared" in refused.reason
        # INVITEs: no offer (488), an unshared channel (404), an offer without video (488).
        for sdp, status in ((b"", 488),
                            (b"v=0\r\no=x 0 0 IN IP4 127.0.0.1\r\ns=Play\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                             b"m=video 6000 RTP/AVP 96\r\na=recvonly\r\na=rtpmap:96 PS/90000\r\ny=0100000001\r\n", 404),
                            (b"v=0\r\no=x 0 0 IN IP4 127.0.0.1\r\ns=Play\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                             b"m=audio 6000 RTP/AVP 8\r\n", 488)):
            raw.send(invite_bytes(raw, "34020100001310000099", sdp))
            responses = [await raw.recv()]
            while responses[-1].status < 200:
                responses.append(await raw.recv())
            assert responses[-1].status == status, responses[-1].reason
            assert responses[0].status == 100 or status == responses[0].status
        # SUBSCRIBE to something we do not offer; BYE and INFO outside any dialog.
        raw.send(request_bytes(raw, "SUBSCRIBE", headers={"Event": "Weather"}))
        assert (await raw.recv()).status == 489
        for method in ("BYE", "INFO"):
            raw.send(request_bytes(raw, method, to_tag="nope"))
            assert (await raw.recv()).status == 481
        # Still serving: the next keepalive goes out and a DeviceStatus is answered.
        raw.send(query(raw, "DeviceStatus", 9))
        assert (await raw.recv()).status == 200
        assert server.cascade.uplinks[UPPER].registered


def request_bytes(raw: RawSip, method: str, *, body: bytes = b"", content_type: str | None = None,
                  headers: dict[str, str] | None = None, to_tag: str | None = None,
                  uri_user: str = LOWER) -> bytes:
    import os
    lines = [
        f"{method} sip:{uri_user}@127.0.0.1:{raw.server[1]} SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:{raw.port};rport;branch=z9hG4bK{os.urandom(6).hex()}",
        f"From: <sip:{UPPER}@3402000000>;tag={os.urandom(4).hex()}",
        f"To: <sip:{uri_user}@3402010000>" + (f";tag={to_tag}" if to_tag else ""),
        f"Call-ID: {os.urandom(8).hex()}",
        f"CSeq: 1 {method}",
        f"Contact: <sip:{UPPER}@127.0.0.1:{raw.port}>",
        "Max-Forwards: 70",
    ]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def invite_bytes(raw: RawSip, channel: str, sdp: bytes) -> bytes:
    return request_bytes(raw, "INVITE", body=sdp, content_type="APPLICATION/SDP" if sdp else None,
                         headers={"Subject": f"{channel}:0100000001,{UPPER}:0"}, uri_user=channel)


@pytest.mark.parametrize("garbage", [b"\x00\xff" * 40, b"<?xml version='1.0'?><Query/>",
                                     b"<Query><CmdType>Catalog</CmdType><SN>x</SN></Query>"])
async def test_garbage_bodies_never_break_the_lower(make_server, garbage):
    async with RawSip(0, device_id=UPPER, server_id=LOWER) as raw:
        server = await lower_with_upper(make_server, raw)
        raw.server = ("127.0.0.1", server.sip_port)
        await accept_registration(raw, DigestServer("3402000000"))
        raw.send(raw.message_bytes(garbage.decode("latin-1"), device_id=UPPER))
        assert (await raw.recv()).status in (200, 400)
        raw.send(request_bytes(raw, "SUBSCRIBE", body=garbage, content_type="Application/MANSCDP+xml",
                               headers={"Event": "Catalog;id=1", "Expires": "60"}))
        assert (await raw.recv()).status in (200, 400)
        raw.send(invite_bytes(raw, "34020100001310000001", garbage))
        final = await raw.recv()
        while final.status < 200:
            final = await raw.recv()
        assert final.status in (400, 404, 488)
        await asyncio.sleep(0.1)
        assert server.cascade.uplinks[UPPER].registered

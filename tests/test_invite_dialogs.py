"""INVITE dialogs against a hand-driven device on a real UDP socket: answers that come too
late, in-dialog requests that follow Contact and Record-Route, devices behind NAT, and the
RFC 3261 details of the registrar (To tags, Contact expires, digest usernames, reboots)."""

from __future__ import annotations

import asyncio
import random

import pytest

from gb28181 import manscdp
from gb28181.streams import PlayError

from .conftest import wait_for
from .sipclient import RawSip

DEV = "34020000001320000001"
QUIET = {"registration": {"query_device_info": False, "query_basic_param": False},
         "catalog": {"query_on_register": False, "subscribe": False}}


def sdp_answer(port: int, ssrc: str = "0200000001") -> bytes:
    return ("v=0\r\no=34020000001320000001 0 0 IN IP4 127.0.0.1\r\ns=Play\r\n"
            f"c=IN IP4 127.0.0.1\r\nt=0 0\r\nm=video {port} RTP/AVP 96\r\na=sendonly\r\n"
            f"a=rtpmap:96 PS/90000\r\ny={ssrc}\r\n").encode()


async def registered(server, **kw) -> RawSip:
    dev = RawSip(server.sip_port)
    await dev.__aenter__()
    assert (await dev.register(**kw)).status == 200
    return dev


@pytest.mark.parametrize("when", ["after-cancel", "after-transaction-end"])
async def test_a_late_2xx_is_acked_and_then_byed(make_server, when):
    # T1 = 20 ms: Timer B (64 T1) ends the INVITE transaction at 1.28 s.
    server = await make_server(**QUIET, sip={"t1": 0.02}, media={"invite_timeout": 0.5})
    dev = await registered(server)
    try:
        play = asyncio.create_task(server.streams.play(DEV, "udp"))
        invite = await dev.request("INVITE")
        cancel = await dev.request("CANCEL", timeout=3)
        assert cancel.cseq == (invite.cseq[0], "CANCEL") and cancel.top_via.branch == invite.top_via.branch
        dev.reply(cancel, 200)
        with pytest.raises(PlayError) as err:
            await play
        assert err.value.http_status == 504
        if when == "after-transaction-end":
            await asyncio.sleep(3.0)  # past Timer B and the 64 T1 the layer waits after it
        # The device answers anyway: it must not be left streaming into nothing.
        dev.reply(invite, 200, to_tag="late", body=sdp_answer(40000), content_type="application/sdp",
                  headers={"Contact": f"<sip:{DEV}@127.0.0.1:{dev.port}>"})
        ack = await dev.request("ACK")
        assert ack.call_id == invite.call_id and ack.to_tag == "late" and ack.cseq == (invite.cseq[0], "ACK")
        assert ack.uri == f"sip:{DEV}@127.0.0.1:{dev.port}"
        bye = await dev.request("BYE")
        assert bye.call_id == invite.call_id and bye.to_tag == "late"
        assert bye.from_tag == invite.from_tag and bye.cseq[0] == invite.cseq[0] + 1
        dev.reply(bye, 200)
        assert server.invites.late_answers == 1
    finally:
        await dev.__aexit__()


async def test_a_late_refusal_is_acked(make_server):
    server = await make_server(**QUIET, media={"invite_timeout": 0.5})
    dev = await registered(server)
    try:
        play = asyncio.create_task(server.streams.play(DEV, "udp"))
        invite = await dev.request("INVITE")
        dev.reply(await dev.request("CANCEL", timeout=3), 200)
        with pytest.raises(PlayError):
            await play
        dev.reply(invite, 486, "Busy Here", to_tag="busy")
        ack = await dev.request("ACK")
        # The ACK of a non-2xx belongs to the INVITE's transaction (RFC 3261 §17.1.1.3).
        assert ack.top_via.branch == invite.top_via.branch and ack.to_tag == "busy"
        assert ack.uri == invite.uri
        # Retransmitted, it is ACKed again; and nothing else is sent (no BYE for a refusal).
        dev.reply(invite, 486, "Busy Here", to_tag="busy")
        assert (await dev.request("ACK")).top_via.branch == invite.top_via.branch
        with pytest.raises(TimeoutError):
            await dev.request("BYE", timeout=0.5)
    finally:
        await dev.__aexit__()


async def test_in_dialog_requests_follow_the_contact_and_the_record_route(make_server):
    server = await make_server(**QUIET, media={"stream_timeout": 0.5})
    dev = await registered(server)
    proxy = RawSip(server.sip_port)
    await proxy.__aenter__()
    try:
        play = asyncio.create_task(server.streams.play(DEV, "udp"))
        invite = await dev.request("INVITE")
        # The dialog's target is another port of the device; a proxy asked to stay on the path.
        target = f"sip:{DEV}@127.0.0.1:{dev.port + 1}"
        route = f"<sip:127.0.0.1:{proxy.port};lr>"
        dev.reply(invite, 200, to_tag="d1", body=sdp_answer(40000), content_type="application/sdp",
                  headers={"Contact": f"<{target}>", "Record-Route": route})
        ack = await proxy.request("ACK")
        assert ack.uri == target and ack.get_all("route") == [route]
        # No RTP follows: the server ends the dialog with a BYE, along the same path.
        with pytest.raises(PlayError):
            await play
        bye = await proxy.request("BYE")
        assert bye.uri == target and bye.get_all("route") == [route] and bye.to_tag == "d1"
        proxy.reply(bye, 200)
        assert not dev.requests or all(r.method not in ("ACK", "BYE") for r in dev.requests)
    finally:
        await proxy.__aexit__()
        await dev.__aexit__()


async def test_a_device_behind_nat_gets_in_dialog_requests_at_its_public_address(make_server):
    server = await make_server(**QUIET, media={"stream_timeout": 0.5})
    # Its Contact names a private address nobody can reach; its packets come from the socket.
    dev = await registered(server, contact_host="192.168.77.10")
    try:
        play = asyncio.create_task(server.streams.play(DEV, "udp"))
        invite = await dev.request("INVITE")
        dev.reply(invite, 200, to_tag="n1", body=sdp_answer(40000), content_type="application/sdp",
                  headers={"Contact": f"<sip:{DEV}@192.168.77.10:5060>"})
        ack = await dev.request("ACK")
        assert ack.uri == f"sip:{DEV}@192.168.77.10:5060"
        with pytest.raises(PlayError):
            await play
        bye = await dev.request("BYE")
        assert bye.to_tag == "n1"
        dev.reply(bye, 200)
    finally:
        await dev.__aexit__()


async def test_a_bye_from_the_device_must_match_the_dialog(make_server):
    server = await make_server(**QUIET, media={"stream_timeout": 5})
    dev = await registered(server)
    try:
        play = asyncio.create_task(server.streams.play(DEV, "udp"))
        invite = await dev.request("INVITE")
        dev.reply(invite, 200, to_tag="d2", body=sdp_answer(40000), content_type="application/sdp",
                  headers={"Contact": f"<sip:{DEV}@127.0.0.1:{dev.port}>"})
        await dev.request("ACK")
        session = next(iter(server.invites.sessions.values()))

        def bye(from_tag: str, to_tag: str) -> bytes:
            return (f"BYE sip:{server.config.server.id}@127.0.0.1:{server.sip_port} SIP/2.0\r\n"
                    f"Via: SIP/2.0/UDP 127.0.0.1:{dev.port};rport;branch=z9hG4bK{random.getrandbits(40)}\r\n"
                    f"From: <sip:{DEV}@3402000000>;tag={from_tag}\r\n"
                    f"To: <sip:{server.config.server.id}@3402000000>;tag={to_tag}\r\n"
                    f"Call-ID: {invite.call_id}\r\nCSeq: 5 BYE\r\nContent-Length: 0\r\n\r\n").encode()
        dev.send(bye("d2", "wrong"))
        assert (await dev.recv()).status == 481
        assert not session.closed
        dev.send(bye("d2", invite.from_tag))
        assert (await dev.recv()).status == 200
        with pytest.raises(PlayError):
            await play
        assert session.closed and session.close_reason == "the device sent BYE"
    finally:
        await dev.__aexit__()


# -- the registrar's RFC 3261 details ------------------------------------------------------------

async def test_every_final_response_has_a_to_tag(make_server):
    server = await make_server(**QUIET)
    async with RawSip(server.sip_port) as dev:
        def request(method: str, extra: str = "", cseq: int = 1) -> bytes:
            return (f"{method} sip:{server.config.server.id}@127.0.0.1:{server.sip_port} SIP/2.0\r\n"
                    f"Via: SIP/2.0/UDP 127.0.0.1:{dev.port};rport;branch=z9hG4bK{random.getrandbits(40)}\r\n"
                    f"From: <sip:{DEV}@3402000000>;tag=a\r\nTo: <sip:{server.config.server.id}@3402000000>\r\n"
                    f"Call-ID: {random.getrandbits(60)}\r\nCSeq: {cseq} {method}\r\n"
                    f"{extra}Content-Length: 0\r\n\r\n").encode()
        for method, extra, status in (("OPTIONS", "", 200), ("PUBLISH", "", 405), ("BYE", "", 481),
                                      ("CANCEL", "", 481), ("MESSAGE", "Content-Type: text/plain\r\n", 415)):
            dev.send(request(method, extra))
            resp = await dev.recv()
            assert resp.status == status and resp.to_tag, (method, resp.status, resp.headers["to"])
        dev.send(request("MESSAGE").replace(b"CSeq: 1 MESSAGE", b"CSeq: 1 INVITE"))
        bad = await dev.recv()
        assert bad.status == 400 and bad.to_tag
        # Two OPTIONS get two different tags (nothing fixed in the code).
        dev.send(request("OPTIONS"))
        dev.send(request("OPTIONS"))
        assert (await dev.recv()).to_tag != (await dev.recv()).to_tag


async def test_contact_expires_beats_the_header_and_the_grant_is_echoed(make_server):
    server = await make_server(**QUIET)
    async with RawSip(server.sip_port) as dev:
        dev.send(dev.register_bytes(expires=3600, contact_params=";expires=120"))
        challenge = await dev.recv()
        dev.send(dev.register_bytes(expires=3600, contact_params=";expires=120",
                                    authorization=dev.answer(challenge)))
        ok = await dev.recv()
        assert ok.status == 200 and ok.get("expires") == "120"
        assert ok.get("contact").endswith(";expires=120") and ok.get("contact").count("expires") == 1
        assert server.registry.get(DEV).expires == 120
        # Too long a Contact expires is cut, and the 200 says what was granted.
        dev.send(dev.register_bytes(expires=60, contact_params=";expires=999999"))
        challenge = await dev.recv()
        dev.send(dev.register_bytes(expires=60, contact_params=";expires=999999",
                                    authorization=dev.answer(challenge)))
        ok = await dev.recv()
        assert ok.get("expires") == "86400" and ok.get("contact").endswith(";expires=86400")


async def test_digest_username_may_differ_from_the_device_id(make_server):
    server = await make_server(**QUIET)
    dev = await registered(server, username="admin")  # Hikvision's "SIP user authentication ID"
    try:
        assert server.registry.get(DEV).online
        # With an auth username configured for the device, only that one is accepted.
        server.registry.get(DEV).extra["auth_username"] = "camuser"
        resp = await dev.register(username="admin")
        assert resp.status == 403 and "username" in resp.reason
        assert (await dev.register(username="camuser")).status == 200
        # The password is still the device's: a wrong one is a wrong password.
        resp = await dev.register(username="camuser", password="nope")
        assert resp.status == 403 and "wrong password" in resp.reason
    finally:
        await dev.__aexit__()


async def test_a_reboot_reregistration_resyncs_the_device(make_server):
    server = await make_server(registration={"query_device_info": True, "query_basic_param": False},
                               catalog={"query_on_register": False, "subscribe": False})
    dev = await registered(server)

    async def answer_device_info() -> None:
        query = await dev.request("MESSAGE")
        assert b"DeviceInfo" in query.body
        dev.reply(query, 200)
        sn = manscdp.parse(query.body).sn
        dev.send(dev.message_bytes(
            f'<?xml version="1.0"?>\r\n<Response>\r\n<CmdType>DeviceInfo</CmdType>\r\n<SN>{sn}</SN>\r\n'
            f"<DeviceID>{DEV}</DeviceID>\r\n<Result>OK</Result>\r\n</Response>\r\n"))

    try:
        await answer_device_info()
        await wait_for(lambda: DEV in server.sync.last, 5, what="the first sync")
        # A refresh in the same registration (same Call-ID) is not a reboot ...
        assert (await dev.register()).status == 200
        with pytest.raises(TimeoutError):
            await dev.request("MESSAGE", timeout=0.6)
        # ... a new Call-ID while online is: the device is asked again.
        dev.call_id = "rebooted-" + dev.call_id
        assert (await dev.register()).status == 200
        await answer_device_info()
    finally:
        await dev.__aexit__()


async def test_keepalive_faults_are_kept_and_shown(make_server):
    server = await make_server(**QUIET)
    dev = await registered(server)
    try:
        def keepalive(status: str, faulty: list[str]) -> bytes:
            info = "".join(f"<DeviceID>{d}</DeviceID>" for d in faulty)
            return dev.message_bytes(
                '<?xml version="1.0" encoding="GB2312"?>\r\n<Notify>\r\n<CmdType>Keepalive</CmdType>\r\n'
                f"<SN>7</SN>\r\n<DeviceID>{DEV}</DeviceID>\r\n<Status>{status}</Status>\r\n"
                f"<Info>{info}</Info>\r\n</Notify>\r\n")
        faulty = ["34020000001310000001", "34020000001340000002"]
        for _ in range(2):  # the same report twice is one event
            dev.send(keepalive("ERROR", faulty))
            assert (await dev.recv()).status == 200
        device = server.registry.get(DEV)
        assert device.extra["fault"]["devices"] == faulty
        dev.send(keepalive("OK", []))
        assert (await dev.recv()).status == 200
        assert "fault" not in device.extra
        events = await server.registry.fault_events(DEV)
        assert [(e.status, list(e.devices)) for e in events] == [("OK", []), ("ERROR", faulty)]
        assert server.counters.faults_reported == 1
    finally:
        await dev.__aexit__()


async def test_overload_answers_new_registrations_503_with_retry_after(make_server):
    server = await make_server(**QUIET)
    known = await registered(server)
    try:
        server.endpoint.overload.active = True  # as the queue probe decides under a storm
        async with RawSip(server.sip_port, device_id="34020000001320000002") as new:
            new.send(new.register_bytes())
            resp = await new.recv()
            assert resp.status == 503 and 10 <= int(resp.get("retry-after")) <= 60
        # A device already online keeps its registration (its refresh is not shed).
        assert (await known.register()).status == 200
        assert server.counters.overload_rejected == 1
        server.endpoint.overload.active = False
        async with RawSip(server.sip_port, device_id="34020000001320000002") as new:
            assert (await new.register()).status == 200
    finally:
        await known.__aexit__()


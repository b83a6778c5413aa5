"""The sans-IO dialog layer (RFC 3261 §12) on captured-style messages: creation from a 2xx
(ours) or a request (theirs), route sets, in-dialog request building, CSeq rules and target
refreshes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gb28181.sip.dialog import Dialog, DialogError
from gb28181.sip.message import parse_message

SRV = "34020000002000000001"
CAM = "34020000001320000001"


def answer_200(*, record_route: list[str] = (), contact: str | None = f"<sip:{CAM}@192.168.1.64:5060>",
               to_tag: str = "dev1") -> bytes:
    lines = [
        "SIP/2.0 200 OK",
        "Via: SIP/2.0/UDP 10.0.0.1:5060;rport=5060;branch=z9hG4bKaaa",
        *(f"Record-Route: {r}" for r in record_route),
        f"From: <sip:{SRV}@3402000000>;tag=srv1",
        f"To: <sip:{CAM}@3402000000>;tag={to_tag}",
        "Call-ID: call-1@10.0.0.1",
        "CSeq: 7 INVITE",
    ]
    if contact:
        lines.append(f"Contact: {contact}")
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_uac_dialog_from_a_200():
    d = Dialog.from_response(parse_message(answer_200()))
    assert d.id == ("call-1@10.0.0.1", "srv1", "dev1")
    assert d.local_uri == f"sip:{SRV}@3402000000" and d.remote_uri == f"sip:{CAM}@3402000000"
    assert d.remote_target == f"sip:{CAM}@192.168.1.64:5060"
    assert d.local_cseq == 7 and d.route_set == [] and d.state == "confirmed"


def test_ack_and_bye_go_to_the_remote_target_with_the_right_cseqs():
    d = Dialog.from_response(parse_message(answer_200()))
    ack = d.ack(7, via="SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKack")
    assert ack.method == "ACK" and ack.uri == f"sip:{CAM}@192.168.1.64:5060"
    assert ack.cseq == (7, "ACK") and ack.from_tag == "srv1" and ack.to_tag == "dev1"
    bye = d.request("BYE", via="SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKbye")
    assert bye.cseq == (8, "BYE") and bye.uri == d.remote_target and "route" not in bye.headers
    info = d.request("INFO", via="SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKinfo")
    assert info.cseq == (9, "INFO")
    # The bytes parse back as what they say.
    again = parse_message(bye.serialize())
    assert again.call_id == "call-1@10.0.0.1" and again.to_tag == "dev1"
    with pytest.raises(DialogError):
        d.request("ACK", via="x")


def test_loose_route_set_is_the_record_route_reversed():
    rr = ["<sip:10.9.9.2:5060;lr>", "<sip:10.9.9.1:5060;lr>"]
    d = Dialog.from_response(parse_message(answer_200(record_route=rr)))
    assert d.route_set == list(reversed(rr))
    bye = d.request("BYE", via="SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKb")
    assert bye.uri == f"sip:{CAM}@192.168.1.64:5060"
    assert bye.get_all("route") == ["<sip:10.9.9.1:5060;lr>", "<sip:10.9.9.2:5060;lr>"]
    hop = d.next_hop()
    assert hop is not None and (hop.host, hop.port) == ("10.9.9.1", 5060)


def test_strict_router_gets_the_request_uri_and_the_target_goes_last():
    d = Dialog.from_response(parse_message(answer_200(record_route=["<sip:10.9.9.1:5070>"])))
    bye = d.request("BYE", via="SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKb")
    assert bye.uri == "sip:10.9.9.1:5070"
    assert bye.get_all("route") == [f"<sip:{CAM}@192.168.1.64:5060>"]


def test_no_contact_falls_back_to_the_request_uri_used():
    resp = parse_message(answer_200(contact=None))
    d = Dialog.from_response(resp, fallback_target=f"sip:{CAM}@10.0.0.9:5060")
    assert d.remote_target == f"sip:{CAM}@10.0.0.9:5060"
    hop = d.next_hop()
    assert hop is not None and (hop.host, hop.port) == ("10.0.0.9", 5060)


def test_a_response_without_our_tag_makes_no_dialog():
    raw = answer_200().replace(b";tag=srv1", b"")
    with pytest.raises(DialogError):
        Dialog.from_response(parse_message(raw))


def incoming(method: str, cseq: int, *, from_tag: str = "dev1", to_tag: str = "srv1",
             contact: str | None = None) -> bytes:
    lines = [
        f"{method} sip:{SRV}@10.0.0.1:5060 SIP/2.0",
        "Via: SIP/2.0/UDP 192.168.1.64:5060;branch=z9hG4bK" + f"{method}{cseq}",
        f"From: <sip:{CAM}@3402000000>;tag={from_tag}",
        f"To: <sip:{SRV}@3402000000>;tag={to_tag}",
        "Call-ID: call-1@10.0.0.1",
        f"CSeq: {cseq} {method}",
    ]
    if contact:
        lines.append(f"Contact: {contact}")
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_peer_requests_must_not_go_back_in_cseq():
    d = Dialog.from_response(parse_message(answer_200()))
    assert d.matches(parse_message(incoming("INFO", 20)))
    assert d.receive_request(parse_message(incoming("INFO", 20))) is None
    assert d.receive_request(parse_message(incoming("INFO", 21))) is None
    assert d.receive_request(parse_message(incoming("INFO", 19))) == 500
    assert d.remote_cseq == 21
    assert not d.matches(parse_message(incoming("BYE", 22, from_tag="other")))
    assert not d.matches(parse_message(incoming("BYE", 22, to_tag="other")))


def test_notify_refreshes_the_target_and_completes_a_subscription_dialog():
    # A NOTIFY that overtakes the 200 of our SUBSCRIBE makes the dialog (RFC 6665 §4.1.2.4).
    notify = parse_message(incoming("NOTIFY", 1, contact=f"<sip:{CAM}@192.168.1.64:5070>"))
    d = Dialog.from_request(notify, "srv1")
    assert d.local_tag == "srv1" and d.remote_tag == "dev1" and d.remote_cseq == 1
    assert d.remote_target == f"sip:{CAM}@192.168.1.64:5070"
    d.receive_request(parse_message(incoming("NOTIFY", 2, contact=f"<sip:{CAM}@192.168.1.99:5060>")))
    assert d.remote_target == f"sip:{CAM}@192.168.1.99:5060"
    # INFO is not a target refresh: its Contact is ignored.
    d.receive_request(parse_message(incoming("INFO", 3, contact="<sip:x@1.2.3.4>")))
    assert d.remote_target == f"sip:{CAM}@192.168.1.99:5060"


def test_early_dialog_from_a_tagged_101_is_confirmed_by_the_200():
    early = parse_message(answer_200().replace(b"200 OK", b"101 Dialog Establishement"))
    d = Dialog.from_response(early)
    assert d.state == "early" and d.remote_tag == "dev1"
    d.receive_response(parse_message(answer_200(contact="<sip:x@192.168.1.65:5060>")))
    assert d.state == "confirmed" and d.remote_target == "sip:x@192.168.1.65:5060"


def test_uas_dialog_builds_the_bye_back():
    invite = parse_message(
        (f"INVITE sip:{CAM}@192.168.1.64:5060 SIP/2.0\r\n"
         "Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKi\r\n"
         "Record-Route: <sip:10.9.9.1;lr>\r\n"
         f"From: <sip:{SRV}@3402000000>;tag=srv1\r\n"
         f"To: <sip:{CAM}@3402000000>\r\n"
         "Call-ID: c2\r\nCSeq: 1 INVITE\r\n"
         f"Contact: <sip:{SRV}@10.0.0.1:5060;transport=tcp>\r\nContent-Length: 0\r\n\r\n").encode())
    d = Dialog.from_request(invite, "dev9")
    bye = d.request("BYE", via="SIP/2.0/TCP 192.168.1.64:5060;branch=z9hG4bKb")
    assert bye.uri == f"sip:{SRV}@10.0.0.1:5060;transport=tcp"
    assert bye.get_all("route") == ["<sip:10.9.9.1;lr>"]
    assert bye.from_tag == "dev9" and bye.to_tag == "srv1" and bye.cseq == (1, "BYE")


@given(st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=30))
def test_remote_cseq_only_moves_forward(numbers):
    d = Dialog.from_response(parse_message(answer_200()))
    high = None
    for n in numbers:
        verdict = d.receive_request(parse_message(incoming("INFO", n)))
        if high is not None and n < high:
            assert verdict == 500
        else:
            assert verdict is None
            high = n
        assert d.remote_cseq == high

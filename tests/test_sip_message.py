"""SIP message codec (gb28181.sip.message) on messages shaped like real GB/T 28181 devices.

The captures below follow PROTOCOL.md §9: a Hik IPC (``.spvmn.cn`` domain host, LF-only
keepalive body, space-padded Content-Length) and a Dahua IPC (alphabetical headers, Via last,
``Route:``, IP:port hosts in From/To).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gb28181.sip.message import (
    MAX_MESSAGE_SIZE,
    SipMessage,
    SipParseError,
    SipRequest,
    SipResponse,
    make_response,
    new_request,
    parse_delta_seconds,
    parse_message,
    parse_name_addr,
    parse_uri,
    parse_via,
    response_bytes,
    user_of,
)

DEV = "34020000001320000001"
SRV = "34020000002000000001"

# Hik IPC REGISTER (SRS-CAP shape): domain host with .spvmn.cn, User-Agent "IP Camera".
HIK_REGISTER = (
    f"REGISTER sip:{SRV}@3402000000 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 192.168.1.64:5060;rport;branch=z9hG4bK1371463273\r\n"
    f"From: <sip:{DEV}@3402000000.spvmn.cn>;tag=2043466181\r\n"
    f"To: <sip:{DEV}@3402000000.spvmn.cn>\r\n"
    "Call-ID: 1011047669\r\n"
    "CSeq: 1 REGISTER\r\n"
    f"Contact: <sip:{DEV}@192.168.1.64:5060>\r\n"
    "Max-Forwards: 70\r\n"
    "User-Agent: IP Camera\r\n"
    "Expires: 3600\r\n"
    "Content-Length: 0\r\n"
    "\r\n"
).encode()

# Hik IPC keepalive body: LF-only, UTF-8 declaration, empty <Info>; 175 bytes.
HIK_KEEPALIVE_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Notify>\n"
    "<CmdType>Keepalive</CmdType>\n"
    "<SN>43</SN>\n"
    f"<DeviceID>{DEV}</DeviceID>\n"
    "<Status>OK</Status>\n"
    "<Info>\n"
    "</Info>\n"
    "</Notify>"
).encode()


def _hik_keepalive(eol: str) -> bytes:
    head = eol.join([
        f"MESSAGE sip:{SRV}@3402000000 SIP/2.0",
        "Via: SIP/2.0/UDP 192.168.1.64:5060;rport;branch=z9hG4bK1935416347",
        f"From: <sip:{DEV}@3402000000.spvmn.cn>;tag=1509398093",
        f"To: <sip:{SRV}@3402000000.spvmn.cn>",
        "Call-ID: 1427568419",
        "CSeq: 20 MESSAGE",
        "Content-Type: Application/MANSCDP+xml",
        "Max-Forwards: 70",
        "User-Agent: IP Camera",
        "Content-Length:   175",
    ])
    return (head + eol + eol).encode() + HIK_KEEPALIVE_BODY


# Dahua IPC REGISTER (DH-CAP shape): headers in alphabetical order, Via last, a Route with
# the device's own ID, From/To with IP:port hosts.
DAHUA_REGISTER = (
    b"REGISTER sip:34020000002000000001@192.168.1.100:5060 SIP/2.0\r\n"
    b"CSeq: 2 REGISTER\r\n"
    b"Call-ID: 1226817935\r\n"
    b"Contact: <sip:34020000001320000002@192.168.1.108:5060>\r\n"
    b"Content-Length: 0\r\n"
    b"Expires: 3600\r\n"
    b"From: <sip:34020000001320000002@192.168.1.108:5060>;tag=1583457049\r\n"
    b"Max-Forwards: 70\r\n"
    b"Route: <sip:34020000001320000002@192.168.1.100:5060;lr>\r\n"
    b"To: <sip:34020000001320000002@192.168.1.108:5060>\r\n"
    b"User-Agent: SIP UAS V3.0.0.1\r\n"
    b"Via: SIP/2.0/UDP 192.168.1.108:5060;rport;branch=z9hG4bK1916442016\r\n"
    b"\r\n"
)

# Dahua's provisional answer to an INVITE: "101 Dialog Establishement" (sic) with a To tag.
DAHUA_101 = (
    "SIP/2.0 101 Dialog Establishement\r\n"
    "Via: SIP/2.0/UDP 192.168.1.100:5060;rport=5060;branch=z9hG4bK3a1b\r\n"
    f"From: <sip:{SRV}@3402000000>;tag=abc\r\n"
    "To: <sip:34020000001320000002@192.168.1.108:5060>;tag=1733236742\r\n"
    "Call-ID: 77@192.168.1.100\r\n"
    "CSeq: 1 INVITE\r\n"
    "Content-Length: 0\r\n"
    "\r\n"
).encode()


def _basic(extra: str = "", *, cseq: str = "1 MESSAGE", method: str = "MESSAGE",
           body: bytes = b"", length: str | None = None) -> bytes:
    head = (
        f"{method} sip:{SRV}@3402000000 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKbasic\r\n"
        f"From: <sip:{DEV}@3402000000>;tag=f1\r\n"
        f"To: <sip:{SRV}@3402000000>\r\n"
        "Call-ID: basic-1\r\n"
        f"CSeq: {cseq}\r\n"
        f"{extra}"
        f"Content-Length: {len(body) if length is None else length}\r\n"
        "\r\n"
    )
    return head.encode() + body


def _same(a: SipMessage, b: SipMessage) -> bool:
    """Equal start line, headers and body; Content-Length is left out (serialize recomputes it)."""
    def heads(m: SipMessage) -> dict[str, list[str]]:
        return {k: v for k, v in m.headers.items() if k != "content-length"}

    if type(a) is not type(b) or heads(a) != heads(b) or a.body != b.body:
        return False
    if isinstance(a, SipRequest):
        assert isinstance(b, SipRequest)
        return (a.method, a.uri) == (b.method, b.uri)
    assert isinstance(a, SipResponse) and isinstance(b, SipResponse)
    return (a.status, a.reason) == (b.status, b.reason)


# -- vendor captures ----------------------------------------------------------------------


def test_hik_register() -> None:
    msg = parse_message(HIK_REGISTER)
    assert isinstance(msg, SipRequest)
    assert msg.method == "REGISTER" and msg.uri == f"sip:{SRV}@3402000000"
    assert msg.cseq == (1, "REGISTER")
    assert msg.call_id == "1011047669"
    assert msg.from_tag == "2043466181" and msg.to_tag is None
    assert user_of(msg.get("from")) == DEV and user_of(msg.get("to")) == DEV
    from_uri = parse_uri(parse_name_addr(msg.get("From")).uri)
    assert from_uri.host == "3402000000.spvmn.cn" and from_uri.port is None
    contact = parse_uri(parse_name_addr(msg.get("contact")).uri)
    assert (contact.user, contact.host, contact.port) == (DEV, "192.168.1.64", 5060)
    via = msg.top_via
    assert (via.transport, via.host, via.port) == ("UDP", "192.168.1.64", 5060)
    assert via.branch == "z9hG4bK1371463273" and "rport" in via.params and via.params["rport"] is None
    assert msg.get("Expires") == "3600" and msg.get("user-agent") == "IP Camera"
    assert msg.body == b""


@pytest.mark.parametrize("eol", ["\r\n", "\n"], ids=["crlf-head", "lf-only"])
def test_hik_keepalive_lf_body_padded_length(eol: str) -> None:
    assert len(HIK_KEEPALIVE_BODY) == 175
    msg = parse_message(_hik_keepalive(eol))
    assert isinstance(msg, SipRequest) and msg.method == "MESSAGE"
    assert msg.cseq == (20, "MESSAGE")
    assert msg.body == HIK_KEEPALIVE_BODY
    assert msg.content_type == "application/manscdp+xml"
    assert msg.get("content-length").strip() == "175"
    # Re-serialized with CRLF and an exact Content-Length, the body is untouched.
    again = parse_message(msg.serialize())
    assert again.body == HIK_KEEPALIVE_BODY and b"Content-Length: 175\r\n" in msg.serialize()


def test_hik_keepalive_stream_mode() -> None:
    msg = parse_message(_hik_keepalive("\n"), stream=True)
    assert msg.body == HIK_KEEPALIVE_BODY


def test_dahua_register_alphabetical_via_last_route() -> None:
    msg = parse_message(DAHUA_REGISTER)
    assert isinstance(msg, SipRequest)
    assert msg.method == "REGISTER" and msg.cseq == (2, "REGISTER")
    assert msg.top_via.host == "192.168.1.108" and msg.top_via.branch == "z9hG4bK1916442016"
    assert msg.get_all("route") == ["<sip:34020000001320000002@192.168.1.100:5060;lr>"]
    route = parse_name_addr(msg.get("route"))
    assert parse_uri(route.uri).params == {"lr": None}
    frm = parse_uri(parse_name_addr(msg.get("from")).uri)
    to = parse_uri(parse_name_addr(msg.get("to")).uri)
    assert (frm.user, frm.host, frm.port) == ("34020000001320000002", "192.168.1.108", 5060)
    assert (to.host, to.port) == ("192.168.1.108", 5060)
    assert msg.from_tag == "1583457049" and msg.to_tag is None
    assert msg.get("user-agent") == "SIP UAS V3.0.0.1"


def test_dahua_101_with_to_tag() -> None:
    msg = parse_message(DAHUA_101)
    assert isinstance(msg, SipResponse)
    assert msg.status == 101 and msg.reason == "Dialog Establishement"
    assert msg.to_tag == "1733236742" and msg.cseq == (1, "INVITE")
    assert msg.top_via.params["rport"] == "5060"


def test_compact_header_forms() -> None:
    data = (
        f"MESSAGE sip:{SRV}@3402000000 SIP/2.0\r\n"
        "v: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKcompact\r\n"
        f"f: <sip:{DEV}@3402000000>;tag=a\r\n"
        f"t: <sip:{SRV}@3402000000>\r\n"
        "i: compact-call\r\n"
        "CSeq: 7 MESSAGE\r\n"
        f"m: <sip:{DEV}@10.0.0.2:5060>\r\n"
        "c: Application/MANSCDP+xml\r\n"
        "l: 4\r\n"
        "\r\n"
        "abcdXYZ"
    ).encode()
    msg = parse_message(data)
    assert msg.call_id == "compact-call" and msg.from_tag == "a"
    assert msg.top_via.branch == "z9hG4bKcompact"
    assert user_of(msg.get("contact")) == DEV
    assert msg.content_type == "application/manscdp+xml"
    assert msg.body == b"abcd"  # l: 4 cuts the datagram's trailing bytes
    out = msg.serialize()
    for name in (b"Via:", b"From:", b"To:", b"Call-ID:", b"Contact:", b"Content-Type:",
                 b"Content-Length: 4"):
        assert b"\r\n" + name in out


def test_header_names_in_odd_case() -> None:
    data = (
        f"MESSAGE sip:{SRV}@3402000000 SIP/2.0\r\n"
        "vIA: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKcase\r\n"
        f"FROM: <sip:{DEV}@3402000000>;TAG=x1\r\n"
        f"to: <sip:{SRV}@3402000000>\r\n"
        "cALL-iD: case-call\r\n"
        "cseq: 3 message\r\n"
        "content-TYPE: APPLICATION/MANSCDP+XML\r\n"
        "CONTENT-LENGTH: 2\r\n"
        "\r\n"
        "ok"
    ).encode()
    msg = parse_message(data)
    assert msg.call_id == "case-call"
    assert msg.cseq == (3, "MESSAGE")  # the method in CSeq matches case-insensitively
    assert msg.from_tag == "x1"
    assert msg.get("Content-Type") == "APPLICATION/MANSCDP+XML"
    assert msg.content_type == "application/manscdp+xml"
    assert msg.body == b"ok"
    out = msg.serialize()
    assert b"\r\nCall-ID: case-call\r\n" in out and b"\r\nCSeq: 3 message\r\n" in out


def test_request_method_is_upper_cased() -> None:
    msg = parse_message(_basic(method="message", cseq="1 message"))
    assert isinstance(msg, SipRequest) and msg.method == "MESSAGE"


def test_folded_header_lines() -> None:
    data = _basic("Subject: 34020000001320000001:0200000001,\r\n"
                  "   34020000002000000001:0\r\n"
                  "X-Long: one\r\n\ttwo\r\n three\r\n")
    msg = parse_message(data)
    assert msg.get("subject") == "34020000001320000001:0200000001, 34020000002000000001:0"
    assert msg.get("x-long") == "one two three"
    assert _same(parse_message(msg.serialize()), msg)


def test_folded_via_list() -> None:
    data = (
        b"OPTIONS sip:x@h SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP a.example:5060;branch=z9hG4bKa,\r\n"
        b" SIP/2.0/UDP b.example;branch=z9hG4bKb\r\n"
        b"From: <sip:a@h>;tag=1\r\nTo: <sip:x@h>\r\nCall-ID: fv\r\nCSeq: 1 OPTIONS\r\n\r\n"
    )
    msg = parse_message(data)
    assert [parse_via(v).host for v in msg.get_all("via")][0] == "a.example"
    assert "b.example" in ",".join(msg.get_all("via"))


def test_continuation_line_first_is_an_error() -> None:
    data = b"MESSAGE sip:x@h SIP/2.0\r\n folded: nothing\r\nVia: SIP/2.0/UDP h\r\n\r\n"
    with pytest.raises(SipParseError) as info:
        parse_message(data)
    assert isinstance(info.value.message, SipRequest)


def test_multiple_vias_one_header_and_several() -> None:
    data = (
        b"SIP/2.0 200 OK\r\n"
        b"Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1;received=1.2.3.4, "
        b"SIP/2.0/TCP proxy.example:5061;branch=z9hG4bK2\r\n"
        b"v: SIP/2.0/UDP 10.0.0.3;branch=z9hG4bK3\r\n"
        b"Via: SIP/2.0/UDP [2001:db8::9]:5070;branch=z9hG4bK4,SIP/2.0/UDP 10.0.0.5;branch=z9hG4bK5\r\n"
        b"From: <sip:a@h>;tag=1\r\nTo: <sip:b@h>;tag=2\r\nCall-ID: mv\r\nCSeq: 9 MESSAGE\r\n\r\n"
    )
    msg = parse_message(data)
    vias = [parse_via(v) for v in msg.get_all("via")]
    assert [v.branch for v in vias] == [f"z9hG4bK{i}" for i in range(1, 6)]
    assert [v.transport for v in vias] == ["UDP", "TCP", "UDP", "UDP", "UDP"]
    assert vias[0].params["received"] == "1.2.3.4"
    assert (vias[3].host, vias[3].port) == ("2001:db8::9", 5070)
    assert msg.top_via.branch == "z9hG4bK1"
    again = parse_message(msg.serialize())
    assert again.get_all("via") == msg.get_all("via")
    # make_response copies every Via, in order.
    assert msg.serialize().count(b"\r\nVia: ") == 5


def test_ipv6_via() -> None:
    via = parse_via("SIP/2.0/UDP [2001:db8::1]:5060;rport;branch=z9hG4bKv6")
    assert (via.transport, via.host, via.port, via.branch) == ("UDP", "2001:db8::1", 5060,
                                                               "z9hG4bKv6")
    assert str(via) == "SIP/2.0/UDP [2001:db8::1]:5060;rport;branch=z9hG4bKv6"
    no_port = parse_via("SIP/2.0/TCP [::1];branch=z9hG4bKx")
    assert (no_port.host, no_port.port) == ("::1", None)
    data = (
        b"OPTIONS sip:x@[2001:db8::2] SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bKv6\r\n"
        b"From: <sip:a@[2001:db8::1]>;tag=1\r\nTo: <sip:x@[2001:db8::2]>\r\n"
        b"Call-ID: v6\r\nCSeq: 1 OPTIONS\r\n\r\n"
    )
    msg = parse_message(data)
    assert msg.top_via.host == "2001:db8::1"
    assert parse_uri(parse_name_addr(msg.get("to")).uri).host == "2001:db8::2"


def test_via_details() -> None:
    via = parse_via("  SIP/2.0/udp host.example ; branch=z9hG4bKq ; RPORT = 5062 ; received=9.9.9.9 ")
    assert via.transport == "UDP" and via.host == "host.example" and via.port is None
    assert via.params == {"branch": "z9hG4bKq", "rport": "5062", "received": "9.9.9.9"}
    assert str(parse_via(str(via))) == str(via)


# -- body length -----------------------------------------------------------------------------


def test_content_length_shorter_than_body_cuts() -> None:
    msg = parse_message(_basic(body=b"0123456789", length="4"))
    assert msg.body == b"0123"


def test_no_content_length_on_udp_takes_rest() -> None:
    data = _basic(body=b"hello").replace(b"Content-Length: 5\r\n", b"")
    assert parse_message(data).body == b"hello"
    assert parse_message(data, stream=True).body == b""


def test_content_length_longer_than_body_keeps_partial_request() -> None:
    data = _basic(body=b"short", length="500")
    with pytest.raises(SipParseError) as info:
        parse_message(data)
    assert "Content-Length" in str(info.value)
    partial = info.value.message
    assert isinstance(partial, SipRequest) and partial.method == "MESSAGE"
    resp = make_response(partial, 400, "Bad Request: truncated")
    assert resp.status == 400 and resp.call_id == "basic-1" and resp.cseq == (1, "MESSAGE")
    parse_message(resp.serialize())


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "", "0x10", "\u00b2", "\u0663", "9" * 5000])
def test_invalid_content_length(value: str) -> None:
    data = _basic(body=b"x", length=value)
    with pytest.raises(SipParseError) as info:
        parse_message(data)
    assert isinstance(info.value.message, SipRequest)


def test_huge_but_numeric_content_length_is_a_truncation() -> None:
    with pytest.raises(SipParseError) as info:
        parse_message(_basic(body=b"x", length="0" * 30 + "99999999999999999999999"))
    assert isinstance(info.value.message, SipRequest)


def test_padded_content_length_with_leading_zeros() -> None:
    assert parse_message(_basic(body=b"abc", length="  003 ")).body == b"abc"


# -- broken messages ---------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["Via", "From", "To", "Call-ID", "CSeq"])
def test_missing_mandatory_header(header: str) -> None:
    lines = _basic().split(b"\r\n")
    data = b"\r\n".join(line for line in lines if not line.startswith(header.encode() + b":"))
    with pytest.raises(SipParseError, match=f"missing mandatory header {header}") as info:
        parse_message(data)
    assert isinstance(info.value.message, SipRequest)


def test_empty_mandatory_header_counts_as_present_but_cseq_is_checked() -> None:
    with pytest.raises(SipParseError):
        parse_message(_basic(cseq=""))


@pytest.mark.parametrize("cseq", ["abc MESSAGE", "1", "1 ", "-1 MESSAGE", "1.0 MESSAGE",
                                  "2147483648 MESSAGE", "\u00b2 MESSAGE", "\u0661 MESSAGE",
                                  "9" * 5000 + " MESSAGE", "MESSAGE 1",
                                  # str.strip()/split() whitespace that RFC 3261 LWS is not:
                                  "3\x1c MESSAGE", "3 MESSAGE\x1f", "\x1e3 MESSAGE",
                                  "3\x0bMESSAGE", "3\x0cMESSAGE", "3\u3000MESSAGE", "3\x85MESSAGE",
                                  "3\rMESSAGE", "3 MES\x00SAGE", "3 MES SAGE", "3 MESSAGE;x"])
def test_bad_cseq(cseq: str) -> None:
    with pytest.raises(SipParseError, match="CSeq") as info:
        parse_message(_basic(cseq=cseq))
    assert isinstance(info.value.message, SipRequest)


def test_response_cseq_with_a_control_character_is_refused() -> None:
    # Found by fuzzing: str.strip() removes \x1c, so "3\x1c" passed the number check and the
    # transaction layer's `.cseq` later raised a bare ValueError from int().
    data = (
        "SIP/2.0 200 OK\r\n"
        "Via: SIP/2.0/UDP 192.168.1.100:5060;branch=z9hG4bK3a1b\r\n"
        f"From: <sip:{SRV}@3402000000>;tag=abc\r\n"
        f"To: <sip:{DEV}@3402000000>;tag=def\r\n"
        "Call-ID: 77@192.168.1.100\r\n"
        "CSeq: 3\x1c MESSAGE\r\n"
        "Content-Length: 0\r\n"
        "\r\n"
    ).encode()
    with pytest.raises(SipParseError, match="invalid CSeq") as info:
        parse_message(data)
    assert isinstance(info.value.message, SipResponse)


@pytest.mark.parametrize("cseq,stored,parsed", [
    ("7 MESSAGE", "7 MESSAGE", (7, "MESSAGE")),
    ("7 \t message", "7 message", (7, "MESSAGE")),
    ("0007\tMESSAGE", "7 MESSAGE", (7, "MESSAGE")),
    ("0" * 5000 + "1 MESSAGE", "1 MESSAGE", (1, "MESSAGE")),  # int() refuses >4300 digits
])
def test_cseq_is_stored_in_canonical_form(cseq: str, stored: str, parsed: tuple[int, str]) -> None:
    msg = parse_message(_basic(cseq=cseq))
    assert msg.get("cseq") == stored and msg.cseq == parsed
    assert make_response(msg, 200).get("cseq") == stored
    assert _same(parse_message(msg.serialize()), msg)


def test_folded_cseq_is_joined_with_one_space() -> None:
    msg = parse_message(_basic(cseq="5\r\n\t MESSAGE"))
    assert msg.get("cseq") == "5 MESSAGE" and msg.cseq == (5, "MESSAGE")


@pytest.mark.parametrize("code", ["\u00b2\u00b2\u00b2", "\u0662\u0660\u0660", "2\x1c0"])
def test_status_code_must_be_ascii_digits(code: str) -> None:
    data = DAHUA_101.replace(b"101", code.encode(), 1)
    with pytest.raises(SipParseError, match="status line"):
        parse_message(data)


@pytest.mark.parametrize("value,stored", [
    ("3600", "3600"), ("  0 ", "0"), ("\t003600", "3600"), ("4294967295", "4294967295"),
    ("0" * 5000 + "60", "60"),  # int() alone refuses more than 4300 digits
])
def test_expires_is_stored_as_plain_seconds(value: str, stored: str) -> None:
    msg = parse_message(_basic(f"Expires: {value}\r\n", cseq="1 REGISTER", method="REGISTER"))
    assert msg.get("expires") == stored and int(stored) == parse_delta_seconds(value)


@pytest.mark.parametrize("value", ["", "soon", "-1", "1.5", "0x10", "\u00b2", "\u0663",
                                   "4294967296", "9" * 5000,  # above 2**32-1 (RFC 3261 §20.19)
                                   "3600\x1c", "36 00", "3600;refresher=uac",
                                   "Thu, 01 Dec 1994 16:00:00 GMT"])
def test_invalid_expires_is_a_parse_error(value: str) -> None:
    assert parse_delta_seconds(value) is None
    data = _basic(f"Expires: {value}\r\n", cseq="1 REGISTER", method="REGISTER")
    with pytest.raises(SipParseError, match="invalid Expires") as info:
        parse_message(data)
    # The request is still there, so the endpoint can answer it with a 400.
    assert isinstance(info.value.message, SipRequest) and info.value.message.method == "REGISTER"
    with pytest.raises(SipParseError, match="invalid Expires"):
        parse_message(DAHUA_101.replace(b"CSeq:", f"Expires: {value}\r\nCSeq:".encode()))


def test_largest_cseq_accepted() -> None:
    assert parse_message(_basic(cseq="2147483647 MESSAGE")).cseq == (2**31 - 1, "MESSAGE")


def test_cseq_method_mismatch() -> None:
    with pytest.raises(SipParseError, match="does not match") as info:
        parse_message(_basic(cseq="20 REGISTER"))
    partial = info.value.message
    assert isinstance(partial, SipRequest) and partial.call_id == "basic-1"


def test_response_cseq_method_is_not_matched_against_anything() -> None:
    msg = parse_message(DAHUA_101.replace(b"1 INVITE", b"1 MESSAGE"))
    assert msg.cseq == (1, "MESSAGE")


@pytest.mark.parametrize("line", [
    "REGISTER sip:x@h",
    "REGISTER sip:x@h SIP/2.0 extra",
    "REGISTER  sip:x@h SIP/2.0",
    "REGISTER sip:x@h SIP/3.0",
    "REGISTER sip:x@h sip/2.0",
    "REG<>ISTER sip:x@h SIP/2.0",
    "1REGISTER sip:x@h SIP/2.0",
    "SIP/2.0 abc OK",
    "SIP/2.0 2000 OK",
    "SIP/2.0 099 Odd",
    "SIP/3.0 200 OK",
    "HTTP/1.1 200 OK",
    "GET / HTTP/1.1",
])
def test_bad_start_line(line: str) -> None:
    data = _basic().split(b"\r\n", 1)[1]
    with pytest.raises(SipParseError):
        parse_message(line.encode() + b"\r\n" + data)


@pytest.mark.parametrize("line", ["Via SIP/2.0/UDP h", "Bad Name: x", ": novalue"])
def test_bad_header_line(line: str) -> None:
    data = _basic().replace(b"Call-ID:", line.encode() + b"\r\nCall-ID:")
    with pytest.raises(SipParseError) as info:
        parse_message(data)
    assert isinstance(info.value.message, SipRequest)


def test_oversize_message() -> None:
    big = _basic(body=b"x" * (MAX_MESSAGE_SIZE + 1))
    with pytest.raises(SipParseError, match="exceeds"):
        parse_message(big)
    small = _basic(body=b"x" * 100)
    with pytest.raises(SipParseError, match="exceeds"):
        parse_message(small, max_size=len(small) - 1)
    assert parse_message(small, max_size=len(small)).body == b"x" * 100


@pytest.mark.parametrize("data", [b"", b"\r\n", b"\r\n\r\n\n", b"   ", b"\x00\x01\x02"])
def test_empty_or_junk(data: bytes) -> None:
    with pytest.raises(SipParseError):
        parse_message(data)


def test_leading_crlfs_are_skipped() -> None:
    msg = parse_message(b"\r\n\r\n\n\r\n" + HIK_REGISTER)
    assert isinstance(msg, SipRequest) and msg.method == "REGISTER"
    assert _same(msg, parse_message(HIK_REGISTER))


def test_message_without_final_blank_line() -> None:
    # A bodiless datagram cut right after the last header still parses.
    data = HIK_REGISTER.rstrip(b"\r\n")
    assert parse_message(data).get("content-length") == "0"


def test_non_utf8_header_bytes_survive() -> None:
    gb2312_name = "\u6d77\u5eb7".encode("gb2312")  # "海康"
    data = HIK_REGISTER.replace(b"From: <", b'From: "' + gb2312_name + b'" <')
    msg = parse_message(data)
    assert gb2312_name in msg.serialize()
    assert user_of(msg.get("from")) == DEV
    assert _same(parse_message(msg.serialize()), msg)


# -- round trip and building ------------------------------------------------------------------


@pytest.mark.parametrize("data", [HIK_REGISTER, _hik_keepalive("\n"), _hik_keepalive("\r\n"),
                                  DAHUA_REGISTER, DAHUA_101, _basic(body=b"<x/>")],
                         ids=["hik-register", "hik-keepalive-lf", "hik-keepalive", "dahua-register",
                              "dahua-101", "basic"])
def test_round_trip(data: bytes) -> None:
    msg = parse_message(data)
    wire = msg.serialize()
    again = parse_message(wire)
    assert _same(again, msg)
    assert again.serialize() == wire
    assert wire.endswith(b"\r\n\r\n" + msg.body)
    assert wire.count(b"Content-Length:") == 1


def test_new_request_round_trip() -> None:
    req = new_request(
        "MESSAGE", f"sip:{DEV}@192.168.1.64:5060",
        via="SIP/2.0/UDP 10.0.0.1:5060;rport;branch=z9hG4bKnew",
        from_uri=f"sip:{SRV}@3402000000", to_uri=f"sip:{DEV}@3402000000",
        from_tag="ft", call_id="cid-1", cseq=20, contact=f"sip:{SRV}@10.0.0.1:5060",
        headers={"X-GB-Ver": "3.0"}, body=b"<Query/>", content_type="Application/MANSCDP+xml",
        user_agent="gb28181-test")
    wire = req.serialize()
    assert wire.startswith(f"MESSAGE sip:{DEV}@192.168.1.64:5060 SIP/2.0\r\n".encode())
    assert b"\r\nX-GB-Ver: 3.0\r\n" in wire and b"\r\nMax-Forwards: 70\r\n" in wire
    msg = parse_message(wire)
    assert isinstance(msg, SipRequest)
    assert msg.cseq == (20, "MESSAGE") and msg.call_id == "cid-1" and msg.from_tag == "ft"
    assert msg.to_tag is None and msg.body == b"<Query/>"
    assert msg.content_type == "application/manscdp+xml"
    assert msg.headers == {**req.headers, "content-length": ["8"]}


def test_new_request_generates_fresh_identifiers() -> None:
    kw = dict(via="SIP/2.0/UDP h;branch=z9hG4bK1", from_uri="sip:a@h", to_uri="sip:b@h")
    r1, r2 = new_request("OPTIONS", "sip:b@h", **kw), new_request("OPTIONS", "sip:b@h", **kw)
    assert r1.call_id != r2.call_id and r1.from_tag != r2.from_tag
    in_dialog = new_request("BYE", "sip:b@h", to_tag="tt", **kw)
    assert in_dialog.to_tag == "tt"


def test_make_response_copies_and_tags_once() -> None:
    req = parse_message(_basic().replace(
        b"Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKbasic\r\n",
        b"Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKbasic;rport=5060;received=1.1.1.1\r\n"
        b"Via: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bKsecond\r\n"))
    assert isinstance(req, SipRequest)
    resp = make_response(req, 200, to_tag="srv1")
    assert resp.status == 200 and resp.reason == "OK"
    assert resp.get_all("via") == req.get_all("via")
    assert resp.get("from") == req.get("from") and resp.call_id == req.call_id
    assert resp.get("cseq") == req.get("cseq")
    assert resp.to_tag == "srv1"
    assert resp.get("to") == f"<sip:{SRV}@3402000000>;tag=srv1"
    # Only the dialog headers are copied.
    assert "content-length" not in resp.headers and "max-forwards" not in resp.headers

    # A request whose To already has a tag (in-dialog) keeps it; no second tag.
    tagged = parse_message(resp.serialize().replace(b"SIP/2.0 200 OK", b"X", 0))
    in_dialog = parse_message(_basic().replace(f"To: <sip:{SRV}@3402000000>".encode(),
                                               f"To: <sip:{SRV}@3402000000>;tag=old".encode()))
    assert isinstance(in_dialog, SipRequest)
    again = make_response(in_dialog, 200, to_tag="new")
    assert again.get("to").count("tag=") == 1 and again.to_tag == "old"
    assert tagged.to_tag == "srv1"

    # 100 Trying never gets a To tag; the caller's lists are not shared with the response.
    trying = make_response(req, 100, to_tag="srv1")
    assert trying.to_tag is None and trying.reason == "Trying"
    trying.add("via", "SIP/2.0/UDP x;branch=z9hG4bKx")
    assert len(req.get_all("via")) == 2


def test_make_response_body_and_reason() -> None:
    req = parse_message(_basic())
    assert isinstance(req, SipRequest)
    resp = make_response(req, 488, "Not Acceptable Here: no PS", body=b"v=0\r\n",
                         content_type="APPLICATION/SDP")
    wire = resp.serialize()
    assert wire.startswith(b"SIP/2.0 488 Not Acceptable Here: no PS\r\n")
    back = parse_message(wire)
    assert isinstance(back, SipResponse) and back.body == b"v=0\r\n"
    assert back.content_type == "application/sdp"


def test_header_helpers() -> None:
    msg = parse_message(_basic())
    assert "call-id" in msg and "CALL-ID" in msg and "Route" not in msg
    msg.add("Route", "<sip:a@b;lr>")
    msg.add("route", "<sip:c@d;lr>")
    assert msg.get_all("ROUTE") == ["<sip:a@b;lr>", "<sip:c@d;lr>"]
    msg.set("Expires", 60)
    assert msg.get("expires") == "60"
    msg.remove("expires")
    assert msg.get("expires", "none") == "none"


# -- URIs and name-addr -------------------------------------------------------------------


@pytest.mark.parametrize("text,user,host,port", [
    (f"sip:{DEV}@3402000000", DEV, "3402000000", None),
    (f"sip:{DEV}@3402000000.spvmn.cn", DEV, "3402000000.spvmn.cn", None),
    (f"sip:{DEV}@192.168.1.108:5060", DEV, "192.168.1.108", 5060),
    (f"SIP:{DEV}@[2001:db8::1]:5062;transport=tcp", DEV, "2001:db8::1", 5062),
    ("sip:127.0.0.1:5060", "", "127.0.0.1", 5060),
    ("sips:user:secret@host.example?subject=x", "user", "host.example", None),
])
def test_parse_uri(text: str, user: str, host: str, port: int | None) -> None:
    uri = parse_uri(text)
    assert (uri.user, uri.host, uri.port) == (user, host, port)
    assert parse_uri(str(uri)) == uri


def test_parse_uri_params() -> None:
    uri = parse_uri("sip:a@h:5060;transport=TCP;lr")
    assert uri.params == {"transport": "TCP", "lr": None}
    assert str(uri) == "sip:a@h:5060;transport=TCP;lr"


@pytest.mark.parametrize("text", ["", "http://x", "tel:+123", "sip:", "sip:a@", "sip:a@h:0",
                                  "sip:a@h:70000", "sip:a@h:port", "sip:a@[::1", "sip:a@h:\u00b2",
                                  "sip:a@h:" + "1" * 5000, "sip:@:5060"])
def test_parse_uri_errors(text: str) -> None:
    with pytest.raises(SipParseError):
        parse_uri(text)


def test_parse_name_addr() -> None:
    na = parse_name_addr(f'"Camera 1" <sip:{DEV}@3402000000>;tag=abc;expires=60')
    assert na.display == "Camera 1" and na.uri == f"sip:{DEV}@3402000000"
    assert na.tag == "abc" and na.params["expires"] == "60"
    assert parse_name_addr(str(na)) == na
    bare = parse_name_addr(f"sip:{DEV}@192.168.1.1:5060;tag=77")
    assert bare.uri == f"sip:{DEV}@192.168.1.1:5060" and bare.tag == "77" and bare.display == ""
    with pytest.raises(SipParseError):
        parse_name_addr("<sip:a@b;tag=1")


def test_user_of() -> None:
    assert user_of(f"<sip:{DEV}@3402000000.spvmn.cn>;tag=1") == DEV
    assert user_of(f"sip:{DEV}@1.2.3.4:5060") == DEV
    assert user_of("<tel:123>") == "" and user_of("garbage") == "" and user_of("<sip:a@b") == ""


@pytest.mark.parametrize("text", ["", "SIP/2.0", "SIP/2.0/UDP", "SIP/2.0/UDP ;branch=x",
                                  "HTTP/1.1/TCP h", "SIP/2.0/UDP h:99999", "SIP/2.0/UDP [::1",
                                  "SIP/UDP h"])
def test_parse_via_errors(text: str) -> None:
    with pytest.raises(SipParseError):
        parse_via(text)


# -- property tests ------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _check_parse(data: bytes) -> None:
    try:
        msg = parse_message(data)
    except SipParseError as exc:
        assert exc.message is None or isinstance(exc.message, (SipRequest, SipResponse))
        return
    assert isinstance(msg, (SipRequest, SipResponse))
    # Whatever parsed must serialize and parse back to the same thing.
    assert _same(parse_message(msg.serialize()), msg)


@FUZZ
@given(st.binary(max_size=2000))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _check_parse(data)


_SIPPY = st.sampled_from([b"\r\n", b"\n", b":", b" ", b";", b",", b"<", b">", b"\"", b"@",
                          b"SIP/2.0", b"Content-Length: ", b"l:", b"CSeq: ", b"Via: ", b"9",
                          b"\xff", b"\xc2\xb2", b"\t", b"[", b"]", b"0"])


@FUZZ
@given(st.lists(st.one_of(_SIPPY, st.binary(max_size=8)), max_size=60))
def test_fuzz_sip_like_tokens(parts: list[bytes]) -> None:
    _check_parse(b"".join(parts))


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    base = draw(st.sampled_from([HIK_REGISTER, DAHUA_REGISTER, _hik_keepalive("\n"), DAHUA_101]))
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[pos] = draw(st.sampled_from(b"\r\n :;,<>\"0129\x00\xff"))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.one_of(_SIPPY, st.binary(min_size=1, max_size=6)))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 20))]
    return bytes(data)


@FUZZ
@given(_mutated())
def test_fuzz_mutated_register(data: bytes) -> None:
    _check_parse(data)


# What str.strip()/split() treat as whitespace but RFC 3261 LWS is not, and other traps.
_CSEQ_JUNK = st.sampled_from([b"\x1c", b"\x1d", b"\x1e", b"\x1f", b"\x0b", b"\x0c", b"\x00",
                              b"\xc2\x85", b"\xc2\xa0", b"\xe3\x80\x80", b"\xc2\xb2", b"\xd9\xa1",
                              b"\xff", b"\t", b" ", b"\r", b"\n", b"\n ", b"\r\n\t", b";", b"-",
                              b"0" * 5000, b"9" * 12])


@st.composite
def _cseq_line_insertions(draw: st.DrawFn) -> bytes:
    base = draw(st.sampled_from([_basic(cseq="20 MESSAGE"), HIK_REGISTER, DAHUA_101,
                                 DAHUA_REGISTER]))
    start = base.index(b"\nCSeq:") + 1
    end = base.index(b"\n", start)  # the line's own CR/LF may be hit too
    cuts = draw(st.lists(st.integers(start, end), min_size=1, max_size=4))
    data = base
    for pos in sorted(cuts, reverse=True):
        data = data[:pos] + draw(st.one_of(_CSEQ_JUNK, st.binary(min_size=1, max_size=6))) + data[pos:]
    return data


@FUZZ
@given(_cseq_line_insertions())
def test_fuzz_bytes_in_the_cseq_line(data: bytes) -> None:
    # Whatever is inserted into the CSeq line, the parser refuses it or `.cseq` works.
    try:
        msg = parse_message(data)
    except SipParseError:
        return
    number, method = msg.cseq
    assert 0 <= number < 2**31 and re.fullmatch(r"[A-Za-z0-9.!%*_+`'~-]+", method)
    if isinstance(msg, SipRequest):
        assert method == msg.method and make_response(msg, 200).cseq == msg.cseq
    assert _same(parse_message(msg.serialize()), msg)


@FUZZ
@given(st.text(max_size=200))
def test_fuzz_uri_name_addr_via(text: str) -> None:
    for fn in (parse_uri, parse_name_addr, parse_via, user_of):
        try:
            fn(text)
        except SipParseError:
            pass
    for prefix in ("sip:", "SIP/2.0/UDP ", "<sip:", "sip:a@[", "sip:a@h:"):
        for fn in (parse_uri, parse_name_addr, parse_via):
            try:
                fn(prefix + text)
            except SipParseError:
                pass


_TOKEN = st.text(st.characters(codec="ascii", categories=("L", "N")), min_size=1, max_size=12)
_VALUE = st.text(st.characters(codec="utf-8", exclude_characters="\r\n,\"<>"),
                 min_size=1, max_size=40).map(str.strip).filter(bool)


@FUZZ
@given(method=st.sampled_from(["REGISTER", "MESSAGE", "INVITE", "BYE", "NOTIFY", "SUBSCRIBE"]),
       user=_TOKEN, extra=st.dictionaries(_TOKEN.map(lambda t: "X-" + t.lower()), _VALUE, max_size=5),
       body=st.binary(max_size=300), cseq=st.integers(0, 2**31 - 1))
def test_round_trip_generated(method: str, user: str, extra: dict[str, str], body: bytes,
                              cseq: int) -> None:
    req = new_request(method, f"sip:{user}@3402000000", via="SIP/2.0/UDP 10.1.1.1:5060;branch=z9hG4bKp",
                      from_uri=f"sip:{user}@3402000000", to_uri=f"sip:{SRV}@3402000000",
                      cseq=cseq, headers=extra, body=body)
    msg = parse_message(req.serialize())
    assert isinstance(msg, SipRequest)
    assert msg.method == method and msg.body == body and msg.cseq == (cseq, method)
    for name, value in extra.items():
        assert msg.get(name) == value
    assert _same(parse_message(msg.serialize()), msg)
    # The same bytes also come through in stream mode (what the TCP framer hands over).
    assert _same(parse_message(msg.serialize(), stream=True), msg)


@pytest.mark.parametrize("data", [HIK_REGISTER, DAHUA_REGISTER, _basic(), _basic(
    "Via: SIP/2.0/UDP 10.0.0.3:5060;branch=z9hG4bK2, SIP/2.0/UDP 10.0.0.4;branch=z9hG4bK3\r\n"),
    _basic().replace(b"To: <sip:34020000002000000001@3402000000>",
                     b"To: <sip:34020000002000000001@3402000000>;tag=already"),
    _basic("X-Name: \xe6\x91\x84\r\n".encode("latin-1").decode("latin-1"))])
@pytest.mark.parametrize("status,reason,extra", [
    (100, "", None), (200, "OK", {"expires": "3600", "date": "2026-11-30T12:00:00.000",
                                  "contact": "<sip:a@b:5060>;expires=3600"}),
    (401, "Unauthorized", {"www-authenticate": 'Digest realm="3402000000", nonce="n"'}),
    (403, "Forbidden: wrong password", None), (423, "", {"min-expires": "3600"}),
    (503, "Service Unavailable", {"retry-after": "30", "x-gb-ver": "3.0"})])
def test_response_bytes_is_make_response_serialized(data: bytes, status: int, reason: str,
                                                    extra: dict[str, str] | None) -> None:
    request = parse_message(data)
    assert isinstance(request, SipRequest)
    expected = make_response(request, status, reason, to_tag="t1", extra=extra).serialize()
    assert response_bytes(request, status, reason, to_tag="t1", extra=extra) == expected

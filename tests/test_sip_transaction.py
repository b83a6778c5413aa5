"""RFC 3261 §17 transactions (gb28181.sip.transaction) with injected time: nothing sleeps."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gb28181.sip.message import (
    SipRequest,
    SipResponse,
    make_response,
    new_branch,
    new_request,
    parse_message,
)
from gb28181.sip.transaction import (
    CancelReceived,
    ClientTransaction,
    RequestReceived,
    ResponseReceived,
    ServerTransaction,
    StrayResponse,
    TransactionLayer,
    TransactionTimedOut,
)

DEV = "34020000001320000001"
SRV = "34020000002000000001"
DEV_ADDR = ("192.168.1.64", 5060)
SRV_ADDR = ("10.0.0.1", 5060)

# Client non-INVITE (Timer E): T1 doubling capped at T2 = 4 s, Timer F at 64·T1 = 32 s.
E_TIMES = [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
# Client INVITE (Timer A): T1 doubling without a cap, Timer B at 32 s.
A_TIMES = [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
# Server 2xx/non-2xx to INVITE over UDP (Timer G): T1 doubling capped at T2.
G_TIMES = E_TIMES


def _request(method: str = "MESSAGE", *, call_id: str = "call-1", cseq: int = 20,
             branch: str | None = None, from_tag: str = "ftag", transport: str = "UDP",
             body: bytes = b"") -> SipRequest:
    return new_request(
        method, f"sip:{SRV}@3402000000",
        via=f"SIP/2.0/{transport} {DEV_ADDR[0]}:{DEV_ADDR[1]};rport;branch={branch or new_branch()}",
        from_uri=f"sip:{DEV}@3402000000", to_uri=f"sip:{SRV}@3402000000",
        from_tag=from_tag, call_id=call_id, cseq=cseq, body=body)


def _wire(msg: SipRequest | SipResponse) -> SipRequest | SipResponse:
    """What the peer would see: the message serialized and parsed again."""
    return parse_message(msg.serialize())


def _answer(req: SipRequest, status: int, to_tag: str | None = "ttag") -> SipResponse:
    resp = _wire(make_response(req, status, to_tag=to_tag))
    assert isinstance(resp, SipResponse)
    return resp


def _drive(layer: TransactionLayer, until: float) -> list[tuple[float, list, list]]:
    """Fire every timer up to ``until``; returns (when, datagrams, events) per firing."""
    log = []
    while (when := layer.get_timer()) is not None and when <= until:
        events = layer.handle_timer(when)
        log.append((when, layer.datagrams_to_send(), events))
    return log


def _sends(log: list[tuple[float, list, list]]) -> list[float]:
    return [when for when, sent, _ in log for _ in sent]


def _events(log: list[tuple[float, list, list]]) -> list[tuple[float, object]]:
    return [(when, ev) for when, _, evs in log for ev in evs]


# -- client non-INVITE ---------------------------------------------------------------------------


def test_client_non_invite_retransmits_then_times_out() -> None:
    layer = TransactionLayer()
    req = _request()
    txn = layer.send_request(req, SRV_ADDR, "udp", 0.0)
    assert txn.state == "trying" and txn.branch == req.top_via.branch
    first = layer.datagrams_to_send()
    assert first == [(req.serialize(), "udp", SRV_ADDR)]
    log = _drive(layer, 100.0)
    assert _sends(log) == pytest.approx(E_TIMES)
    assert all(sent == first for _, sent, _ in log if sent)
    events = _events(log)
    assert len(events) == 1
    when, ev = events[0]
    assert when == pytest.approx(32.0)
    assert isinstance(ev, TransactionTimedOut) and ev.transaction is txn
    assert txn.state == "terminated" and layer.client == {}
    assert layer.get_timer() is None
    assert layer.stats["retransmissions"] == len(E_TIMES) and layer.stats["timeouts"] == 1


def test_client_non_invite_over_tcp_does_not_retransmit() -> None:
    layer = TransactionLayer()
    layer.send_request(_request(transport="TCP"), SRV_ADDR, "tcp", 0.0)
    assert len(layer.datagrams_to_send()) == 1
    log = _drive(layer, 100.0)
    assert _sends(log) == []
    assert [(w, type(e)) for w, e in _events(log)] == [(32.0, TransactionTimedOut)]


def test_client_non_invite_over_tcp_final_terminates_at_once() -> None:
    layer = TransactionLayer()
    req = _request(transport="TCP")
    txn = layer.send_request(req, SRV_ADDR, "tcp", 0.0)
    events = layer.receive(_answer(req, 200), SRV_ADDR, "tcp", 1.0)
    assert [type(e) for e in events] == [ResponseReceived]
    assert txn.state == "terminated" and layer.client == {} and layer.get_timer() is None


def test_provisional_switches_to_t2_interval() -> None:
    layer = TransactionLayer()
    req = _request()
    txn = layer.send_request(req, SRV_ADDR, "udp", 0.0)
    layer.datagrams_to_send()
    log = _drive(layer, 0.9)
    assert _sends(log) == [0.5]
    events = layer.receive(_answer(req, 100, to_tag=None), SRV_ADDR, "udp", 1.0)
    assert len(events) == 1 and isinstance(events[0], ResponseReceived)
    assert events[0].response.status == 100 and txn.state == "proceeding"
    # A repeated 1xx is passed up too (the TU may show progress), state unchanged.
    assert len(layer.receive(_answer(req, 100, to_tag=None), SRV_ADDR, "udp", 1.1)) == 1
    log = _drive(layer, 100.0)
    # Timer E was already due at 1.5; from then on it runs every T2.
    assert _sends(log) == pytest.approx([1.5, 5.5, 9.5, 13.5, 17.5, 21.5, 25.5, 29.5])
    assert [type(e) for _, e in _events(log)] == [TransactionTimedOut]


def test_final_response_stops_retransmissions_and_retransmitted_final_is_absorbed() -> None:
    layer = TransactionLayer()
    req = _request()
    txn = layer.send_request(req, SRV_ADDR, "udp", 0.0)
    layer.datagrams_to_send()
    assert _sends(_drive(layer, 2.0)) == [0.5, 1.5]
    ok = _answer(req, 200)
    events = layer.receive(ok, SRV_ADDR, "udp", 2.0)
    assert len(events) == 1 and isinstance(events[0], ResponseReceived)
    assert events[0].response.status == 200 and events[0].transaction is txn
    assert txn.state == "completed" and txn.last_response is ok
    assert layer.receive(_answer(req, 200), SRV_ADDR, "udp", 3.0) == []
    assert layer.receive(_answer(req, 100, to_tag=None), SRV_ADDR, "udp", 3.1) == []
    assert layer.stats["absorbed"] >= 1
    # Timer K (T4 = 5 s) then frees it; nothing was retransmitted meanwhile.
    assert layer.get_timer() == pytest.approx(7.0)
    log = _drive(layer, 100.0)
    assert _sends(log) == [] and _events(log) == []
    assert layer.client == {} and txn.state == "terminated"
    # After that the same response is a stray.
    late = layer.receive(_answer(req, 200), SRV_ADDR, "udp", 8.0)
    assert len(late) == 1 and isinstance(late[0], StrayResponse) and late[0].addr == SRV_ADDR


def test_response_to_unknown_branch_is_stray() -> None:
    layer = TransactionLayer()
    req = _request()
    layer.send_request(req, SRV_ADDR, "udp", 0.0)
    other = _answer(_request(), 200)
    events = layer.receive(other, SRV_ADDR, "udp", 0.1)
    assert [type(e) for e in events] == [StrayResponse]
    # The method is part of the match too: a 200 for CANCEL with the same branch is not ours.
    cancel_resp = _answer(req, 200)
    cancel_resp.set("cseq", "20 CANCEL")
    assert [type(e) for e in layer.receive(cancel_resp, SRV_ADDR, "udp", 0.2)] == [StrayResponse]


def test_send_request_rejects_ack_missing_branch_and_duplicates() -> None:
    layer = TransactionLayer()
    with pytest.raises(ValueError):
        layer.send_request(_request("ACK"), SRV_ADDR, "udp", 0.0)
    no_branch = _request()
    no_branch.set("via", "SIP/2.0/UDP 1.2.3.4:5060")
    with pytest.raises(ValueError):
        layer.send_request(no_branch, SRV_ADDR, "udp", 0.0)
    req = _request(branch="z9hG4bKdup")
    layer.send_request(req, SRV_ADDR, "udp", 0.0)
    with pytest.raises(ValueError):
        layer.send_request(_request(branch="z9hG4bKdup"), SRV_ADDR, "udp", 0.0)


def test_layer_t1_scales_retransmissions() -> None:
    layer = TransactionLayer(t1=0.01)
    layer.send_request(_request(), SRV_ADDR, "udp", 0.0)
    layer.datagrams_to_send()
    log = _drive(layer, 10.0)
    assert _sends(log) == pytest.approx([0.01, 0.03, 0.07, 0.15, 0.31, 0.63])
    assert [(round(w, 6), type(e)) for w, e in _events(log)] == [(0.64, TransactionTimedOut)]


def test_fail_drops_the_transaction() -> None:
    layer = TransactionLayer()
    txn = layer.send_request(_request(), SRV_ADDR, "udp", 0.0)
    layer.fail(txn)
    assert layer.client == {} and layer.get_timer() is None
    assert _drive(layer, 100.0) == []


# -- server non-INVITE -----------------------------------------------------------------------------


def test_server_non_invite_retransmission_gets_same_bytes() -> None:
    layer = TransactionLayer()
    raw = _request().serialize()
    events = layer.receive(parse_message(raw), DEV_ADDR, "udp", 0.0)
    assert len(events) == 1 and isinstance(events[0], RequestReceived)
    ev = events[0]
    assert isinstance(ev.transaction, ServerTransaction) and ev.addr == DEV_ADDR
    assert ev.transport == "udp" and ev.transaction.state == "trying"
    # A retransmission before the TU answered: nothing to send, nothing new for the TU.
    assert layer.receive(parse_message(raw), DEV_ADDR, "udp", 0.3) == []
    assert layer.datagrams_to_send() == []
    layer.send_response(ev.transaction, make_response(ev.request, 200, to_tag="srv"), 0.4)
    out = layer.datagrams_to_send()
    assert len(out) == 1 and out[0][1:] == ("udp", DEV_ADDR)
    assert ev.transaction.state == "completed"
    for t in (0.6, 1.7, 10.0):
        assert layer.receive(parse_message(raw), DEV_ADDR, "udp", t) == []
        assert layer.datagrams_to_send() == out
    # The retransmission came from a new source port (NAT rebinding): answer there.
    moved = ("192.168.1.64", 6000)
    assert layer.receive(parse_message(raw), moved, "udp", 11.0) == []
    assert layer.datagrams_to_send() == [(out[0][0], "udp", moved)]
    with pytest.raises(ValueError):
        layer.send_response(ev.transaction, make_response(ev.request, 500), 12.0)


def test_server_provisional_then_final() -> None:
    layer = TransactionLayer()
    raw = _request().serialize()
    (ev,) = layer.receive(parse_message(raw), DEV_ADDR, "udp", 0.0)
    assert isinstance(ev, RequestReceived) and ev.transaction is not None
    layer.send_response(ev.transaction, make_response(ev.request, 100), 0.1)
    trying = layer.datagrams_to_send()
    assert ev.transaction.state == "proceeding"
    assert layer.receive(parse_message(raw), DEV_ADDR, "udp", 0.2) == []
    assert layer.datagrams_to_send() == trying  # the provisional is repeated
    layer.send_response(ev.transaction, make_response(ev.request, 200, to_tag="x"), 0.3)
    assert ev.transaction.state == "completed"


def test_same_cseq_different_call_ids_are_two_transactions() -> None:
    # Hik and Dahua reuse CSeq 20 for every MESSAGE, and some reuse the branch too.
    layer = TransactionLayer()
    a = _request(call_id="hik-1", cseq=20, branch="z9hG4bKsame")
    b = _request(call_id="hik-2", cseq=20, branch="z9hG4bKsame")
    ev_a = layer.receive(_wire(a), DEV_ADDR, "udp", 0.0)
    ev_b = layer.receive(_wire(b), DEV_ADDR, "udp", 0.1)
    assert [type(e) for e in ev_a + ev_b] == [RequestReceived, RequestReceived]
    assert ev_a[0].transaction is not ev_b[0].transaction
    assert len(layer.server) == 2
    # Same Call-ID, next CSeq, same branch: also a new request.
    c = _request(call_id="hik-1", cseq=21, branch="z9hG4bKsame")
    assert [type(e) for e in layer.receive(_wire(c), DEV_ADDR, "udp", 0.2)] == [RequestReceived]
    # Different From tag, everything else equal: a different request.
    d = _request(call_id="hik-1", cseq=20, branch="z9hG4bKsame", from_tag="other")
    assert [type(e) for e in layer.receive(_wire(d), DEV_ADDR, "udp", 0.3)] == [RequestReceived]
    assert len(layer.server) == 4


def test_timer_j_frees_the_transaction() -> None:
    layer = TransactionLayer()
    (ev,) = layer.receive(_wire(_request()), DEV_ADDR, "udp", 0.0)
    layer.send_response(ev.transaction, make_response(ev.request, 200, to_tag="t"), 1.0)
    layer.datagrams_to_send()
    assert layer.get_timer() == pytest.approx(33.0)
    assert _drive(layer, 32.9) == [] and len(layer.server) == 1
    log = _drive(layer, 33.0)
    assert _sends(log) == [] and _events(log) == []
    assert layer.server == {} and layer.get_timer() is None
    # Now the same request is new again.
    assert len(layer.receive(_wire(ev.request), DEV_ADDR, "udp", 40.0)) == 1


def test_server_non_invite_over_tcp_frees_at_once() -> None:
    layer = TransactionLayer()
    (ev,) = layer.receive(_wire(_request(transport="TCP")), DEV_ADDR, "tcp", 0.0)
    layer.send_response(ev.transaction, make_response(ev.request, 200, to_tag="t"), 0.1)
    assert layer.datagrams_to_send()[0][1] == "tcp"
    assert layer.server == {} and layer.get_timer() is None


def test_unanswered_server_transaction_is_forgotten() -> None:
    layer = TransactionLayer()
    layer.receive(_wire(_request()), DEV_ADDR, "udp", 0.0)
    # The TU did not answer before the caller collected what to send: now Timer Z is armed.
    assert layer.get_timer() is None
    layer.datagrams_to_send()
    log = _drive(layer, 100.0)
    assert [w for w, _, _ in log] == [32.0] and _events(log) == [] and layer.server == {}


# -- client INVITE --------------------------------------------------------------------------------


def test_client_invite_timer_a_doubles_then_b() -> None:
    layer = TransactionLayer()
    txn = layer.send_request(_request("INVITE", cseq=1), SRV_ADDR, "udp", 0.0)
    assert txn.state == "calling"
    layer.datagrams_to_send()
    log = _drive(layer, 100.0)
    assert _sends(log) == pytest.approx(A_TIMES)
    assert [(w, type(e)) for w, e in _events(log)] == [(32.0, TransactionTimedOut)]
    assert layer.client == {}


def test_client_invite_provisional_stops_timer_a() -> None:
    layer = TransactionLayer()
    req = _request("INVITE", cseq=1)
    txn = layer.send_request(req, SRV_ADDR, "udp", 0.0)
    layer.datagrams_to_send()
    assert _sends(_drive(layer, 1.0)) == [0.5]
    # Dahua: "101 Dialog Establishement" with a To tag.
    events = layer.receive(_answer(req, 101, to_tag="dh"), SRV_ADDR, "udp", 1.0)
    assert [type(e) for e in events] == [ResponseReceived] and txn.state == "proceeding"
    assert _sends(_drive(layer, 20.0)) == []
    ok = layer.receive(_answer(req, 200, to_tag="dh"), SRV_ADDR, "udp", 20.0)
    assert [type(e) for e in ok] == [ResponseReceived] and txn.state == "accepted"


def test_client_invite_non_2xx_generates_ack() -> None:
    layer = TransactionLayer()
    req = _request("INVITE", cseq=3)
    req.add("route", f"<sip:{SRV}@10.0.0.1:5060;lr>")
    txn = layer.send_request(req, SRV_ADDR, "udp", 0.0)
    layer.datagrams_to_send()
    layer.receive(_answer(req, 100, to_tag=None), SRV_ADDR, "udp", 0.1)
    busy = _answer(req, 486, to_tag="busy-tag")
    events = layer.receive(busy, SRV_ADDR, "udp", 0.2)
    assert [type(e) for e in events] == [ResponseReceived] and events[0].response.status == 486
    assert txn.state == "completed"
    out = layer.datagrams_to_send()
    assert len(out) == 1 and out[0][1:] == ("udp", SRV_ADDR)
    ack = parse_message(out[0][0])
    assert isinstance(ack, SipRequest) and ack.method == "ACK" and ack.uri == req.uri
    assert ack.top_via.branch == req.top_via.branch
    assert len(ack.get_all("via")) == 1
    assert ack.to_tag == "busy-tag" and ack.from_tag == req.from_tag
    assert ack.call_id == req.call_id and ack.cseq == (3, "ACK")
    assert ack.get_all("route") == req.get_all("route")
    assert ack.body == b""
    # A retransmitted 486 is absorbed and re-ACKed with the same bytes.
    assert layer.receive(_answer(req, 486, to_tag="busy-tag"), SRV_ADDR, "udp", 1.0) == []
    assert layer.datagrams_to_send() == out
    # Timer D (32 s on UDP) frees it; no INVITE retransmissions meanwhile.
    log = _drive(layer, 100.0)
    assert _sends(log) == [] and _events(log) == [] and layer.client == {}
    assert log[-1][0] == pytest.approx(32.2)


def test_client_invite_non_2xx_over_tcp_acks_and_terminates() -> None:
    layer = TransactionLayer()
    req = _request("INVITE", cseq=1, transport="TCP")
    layer.send_request(req, SRV_ADDR, "tcp", 0.0)
    layer.datagrams_to_send()
    layer.receive(_answer(req, 404), SRV_ADDR, "tcp", 0.5)
    (ack,) = layer.datagrams_to_send()
    assert parse_message(ack[0]).method == "ACK" and ack[1] == "tcp"
    assert layer.client == {} and layer.get_timer() is None


def test_client_invite_2xx_accepted_and_retransmitted_2xx_reaches_tu() -> None:
    layer = TransactionLayer()
    req = _request("INVITE", cseq=1)
    txn = layer.send_request(req, SRV_ADDR, "udp", 0.0)
    layer.datagrams_to_send()
    ok = _answer(req, 200, to_tag="dev")
    events = layer.receive(ok, SRV_ADDR, "udp", 0.3)
    assert [type(e) for e in events] == [ResponseReceived] and txn.state == "accepted"
    assert layer.datagrams_to_send() == []  # the TU sends the ACK to a 2xx, not the layer
    again = layer.receive(_answer(req, 200, to_tag="dev"), SRV_ADDR, "udp", 1.0)
    assert [type(e) for e in again] == [ResponseReceived] and again[0].transaction is txn
    assert layer.receive(_answer(req, 180, to_tag="dev"), SRV_ADDR, "udp", 1.1) == []
    assert _sends(_drive(layer, 30.0)) == []
    # Timer M (64·T1) ends the accepted state; later 2xx are strays.
    log = _drive(layer, 100.0)
    assert _events(log) == [] and layer.client == {}
    late = layer.receive(_answer(req, 200, to_tag="dev"), SRV_ADDR, "udp", 40.0)
    assert [type(e) for e in late] == [StrayResponse]


def test_client_invite_final_stops_timer_b() -> None:
    layer = TransactionLayer()
    req = _request("INVITE", cseq=1)
    layer.send_request(req, SRV_ADDR, "udp", 0.0)
    layer.receive(_answer(req, 200), SRV_ADDR, "udp", 0.1)
    assert not any(isinstance(e, TransactionTimedOut) for _, e in _events(_drive(layer, 100.0)))


# -- server INVITE --------------------------------------------------------------------------------


def _server_invite(layer: TransactionLayer, now: float = 0.0, *, transport: str = "udp",
                   branch: str = "z9hG4bKinv") -> tuple[SipRequest, ServerTransaction]:
    req = _request("INVITE", call_id="inv-1", cseq=1, branch=branch,
                   transport=transport.upper(), body=b"v=0\r\n")
    events = layer.receive(_wire(req), DEV_ADDR, transport, now)
    assert len(events) == 1 and isinstance(events[0], RequestReceived)
    txn = events[0].transaction
    assert isinstance(txn, ServerTransaction) and txn.state == "proceeding"
    return events[0].request, txn


def _ack(invite: SipRequest, *, to_tag: str, branch: str) -> SipRequest:
    ack = new_request("ACK", invite.uri,
                      via=f"SIP/2.0/UDP {DEV_ADDR[0]}:{DEV_ADDR[1]};branch={branch}",
                      from_uri=f"sip:{DEV}@3402000000", to_uri=f"sip:{SRV}@3402000000",
                      from_tag=invite.from_tag, to_tag=to_tag, call_id=invite.call_id,
                      cseq=invite.cseq[0])
    result = _wire(ack)
    assert isinstance(result, SipRequest)
    return result


def test_server_invite_2xx_retransmitted_until_ack() -> None:
    layer = TransactionLayer()
    invite, txn = _server_invite(layer)
    layer.send_response(txn, make_response(invite, 100), 0.0)
    layer.send_response(txn, make_response(invite, 180, to_tag="srv"), 0.05)
    layer.send_response(txn, make_response(invite, 200, to_tag="srv", body=b"v=0\r\n",
                                           content_type="APPLICATION/SDP"), 0.1)
    out = layer.datagrams_to_send()
    assert [parse_message(d).status for d, _, _ in out] == [100, 180, 200]
    assert txn.state == "accepted"
    ok_bytes = out[-1][0]
    log = _drive(layer, 8.0)
    assert _sends(log) == pytest.approx([0.6, 1.6, 3.6, 7.6])
    assert all(sent == [(ok_bytes, "udp", DEV_ADDR)] for _, sent, _ in log)
    # A retransmitted INVITE is answered with the 2xx too, and not passed up again.
    assert layer.receive(_wire(invite), DEV_ADDR, "udp", 8.0) == []
    assert layer.datagrams_to_send() == [(ok_bytes, "udp", DEV_ADDR)]
    # The ACK to a 2xx has a new branch; it reaches the TU without a transaction.
    ack = _ack(invite, to_tag="srv", branch="z9hG4bKack")
    events = layer.receive(ack, DEV_ADDR, "udp", 9.0)
    assert len(events) == 1 and isinstance(events[0], RequestReceived)
    assert events[0].transaction is None and events[0].request.method == "ACK"
    assert txn.state == "confirmed"
    log = _drive(layer, 100.0)
    assert _sends(log) == [] and _events(log) == []  # Timer L ends it quietly
    assert layer.server == {}
    # A late retransmitted ACK is still handed to the TU (it owns the dialog).
    late = layer.receive(ack, DEV_ADDR, "udp", 101.0)
    assert [type(e) for e in late] == [RequestReceived] and late[0].transaction is None


def test_server_invite_2xx_without_ack_times_out() -> None:
    layer = TransactionLayer()
    invite, txn = _server_invite(layer)
    layer.send_response(txn, make_response(invite, 200, to_tag="srv"), 0.0)
    layer.datagrams_to_send()
    log = _drive(layer, 100.0)
    assert _sends(log) == pytest.approx(G_TIMES)
    assert [(w, type(e)) for w, e in _events(log)] == [(32.0, TransactionTimedOut)]
    assert _events(log)[0][1].transaction is txn
    assert layer.server == {} and layer.get_timer() is None


def test_server_invite_2xx_over_tcp_not_retransmitted() -> None:
    layer = TransactionLayer()
    invite, txn = _server_invite(layer, transport="tcp")
    layer.send_response(txn, make_response(invite, 200, to_tag="srv"), 0.0)
    layer.datagrams_to_send()
    events = layer.receive(_ack(invite, to_tag="srv", branch="z9hG4bKa2"), DEV_ADDR, "tcp", 1.0)
    assert [type(e) for e in events] == [RequestReceived]
    log = _drive(layer, 100.0)
    assert _sends(log) == [] and _events(log) == [] and layer.server == {}


def test_server_invite_non_2xx_retransmitted_until_ack() -> None:
    layer = TransactionLayer()
    invite, txn = _server_invite(layer)
    layer.send_response(txn, make_response(invite, 486, "Busy Here", to_tag="srv"), 0.0)
    (busy,) = layer.datagrams_to_send()
    assert txn.state == "completed"
    log = _drive(layer, 4.0)
    assert _sends(log) == [0.5, 1.5, 3.5]
    assert all(sent == [busy] for _, sent, _ in log)
    # The ACK to a non-2xx has the INVITE's branch: absorbed here, not passed up.
    ack = _ack(invite, to_tag="srv", branch="z9hG4bKinv")
    assert layer.receive(ack, DEV_ADDR, "udp", 4.0) == []
    assert txn.state == "confirmed"
    assert layer.receive(ack, DEV_ADDR, "udp", 4.1) == []  # retransmitted ACK
    assert layer.receive(_wire(invite), DEV_ADDR, "udp", 4.2) == []  # late INVITE copy
    log = _drive(layer, 100.0)
    assert _sends(log) == [] and _events(log) == []
    assert [w for w, _, _ in log] == [pytest.approx(9.0)]  # Timer I = T4
    assert layer.server == {}


def test_server_invite_non_2xx_without_ack_times_out() -> None:
    layer = TransactionLayer()
    invite, txn = _server_invite(layer)
    layer.send_response(txn, make_response(invite, 404, to_tag="srv"), 0.0)
    layer.datagrams_to_send()
    log = _drive(layer, 100.0)
    assert _sends(log) == pytest.approx(G_TIMES)
    assert [(w, type(e)) for w, e in _events(log)] == [(32.0, TransactionTimedOut)]
    assert layer.server == {}


def test_cancel_of_pending_invite() -> None:
    layer = TransactionLayer()
    invite, txn = _server_invite(layer)
    layer.send_response(txn, make_response(invite, 100), 0.0)
    layer.datagrams_to_send()
    cancel = _request("CANCEL", call_id=invite.call_id, cseq=invite.cseq[0],
                      branch=invite.top_via.branch, from_tag=invite.from_tag)
    events = layer.receive(_wire(cancel), DEV_ADDR, "udp", 1.0)
    assert len(events) == 1 and isinstance(events[0], CancelReceived)
    assert events[0].transaction is txn and events[0].request.method == "CANCEL"
    (sent,) = layer.datagrams_to_send()
    resp = parse_message(sent[0])
    assert isinstance(resp, SipResponse) and resp.status == 200
    assert resp.cseq == (invite.cseq[0], "CANCEL") and sent[2] == DEV_ADDR
    # A retransmitted CANCEL gets the same 200 and no second event.
    assert layer.receive(_wire(cancel), DEV_ADDR, "udp", 1.5) == []
    assert layer.datagrams_to_send() == [sent]
    # The TU ends the INVITE with 487; the device ACKs it.
    layer.send_response(txn, make_response(invite, 487, to_tag="srv"), 2.0)
    (terminated,) = layer.datagrams_to_send()
    assert parse_message(terminated[0]).status == 487
    assert layer.receive(_ack(invite, to_tag="srv", branch=invite.top_via.branch), DEV_ADDR,
                         "udp", 2.1) == []
    assert txn.state == "confirmed"
    _drive(layer, 100.0)
    assert layer.server == {}


def test_cancel_without_invite_gets_481() -> None:
    layer = TransactionLayer()
    cancel = _request("CANCEL", call_id="nothing", cseq=1)
    assert layer.receive(_wire(cancel), DEV_ADDR, "udp", 0.0) == []
    (sent,) = layer.datagrams_to_send()
    resp = parse_message(sent[0])
    assert isinstance(resp, SipResponse) and resp.status == 481 and resp.cseq == (1, "CANCEL")


def test_cancel_after_final_answer_is_only_acknowledged() -> None:
    layer = TransactionLayer()
    invite, txn = _server_invite(layer)
    layer.send_response(txn, make_response(invite, 200, to_tag="srv"), 0.0)
    layer.datagrams_to_send()
    cancel = _request("CANCEL", call_id=invite.call_id, cseq=1, branch=invite.top_via.branch,
                      from_tag=invite.from_tag)
    assert layer.receive(_wire(cancel), DEV_ADDR, "udp", 0.2) == []
    (sent,) = layer.datagrams_to_send()
    assert parse_message(sent[0]).status == 200 and txn.state == "accepted"


def test_stray_ack_is_passed_up() -> None:
    layer = TransactionLayer()
    ack = _request("ACK", call_id="nobody", cseq=1)
    events = layer.receive(_wire(ack), DEV_ADDR, "udp", 0.0)
    assert [type(e) for e in events] == [RequestReceived] and events[0].transaction is None
    assert layer.server == {}


# -- get_timer ------------------------------------------------------------------------------------


def _pending(layer: TransactionLayer) -> float | None:
    deadlines = [when for txns in (layer.client, layer.server) for t in txns.values()
                 for when in t.timers.values()]
    return min(deadlines) if deadlines else None


def test_get_timer_ignores_cancelled_timers() -> None:
    layer = TransactionLayer()
    req = _request()
    layer.send_request(req, SRV_ADDR, "udp", 0.0)
    assert layer.get_timer() == 0.5
    layer.receive(_answer(req, 200), SRV_ADDR, "udp", 0.1)
    # E (0.5) and F (32) are gone; only K (0.1 + T4) is left.
    assert layer.get_timer() == pytest.approx(5.1) == _pending(layer)


def test_get_timer_mixed() -> None:
    layer = TransactionLayer()
    assert layer.get_timer() is None
    inv = _request("INVITE", cseq=1)
    layer.send_request(inv, SRV_ADDR, "udp", 10.0)          # A 10.5, B 42
    layer.send_request(_request(transport="TCP"), SRV_ADDR, "tcp", 0.0)  # F 32
    (ev,) = layer.receive(_wire(_request(call_id="s")), DEV_ADDR, "udp", 1.0)  # Z 33
    assert layer.get_timer() == 10.5 == _pending(layer)
    layer.receive(_answer(inv, 180), SRV_ADDR, "udp", 10.2)  # A cancelled
    assert layer.get_timer() == 32.0 == _pending(layer)
    layer.send_response(ev.transaction, make_response(ev.request, 200, to_tag="t"), 2.0)  # J 34
    assert layer.get_timer() == 32.0 == _pending(layer)
    layer.handle_timer(32.0)
    assert layer.get_timer() == 34.0 == _pending(layer)


_ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["send", "send_invite", "respond_client", "receive", "receive_invite",
                         "answer_server", "ack", "advance"]),
        st.sampled_from([100, 180, 200, 486]),
        st.booleans(),                      # tcp?
        st.floats(0.0, 12.0, allow_nan=False),
        st.integers(0, 1000),               # which transaction
    ),
    max_size=40)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ACTIONS)
def test_get_timer_is_always_earliest_pending_deadline(actions: list) -> None:
    layer = TransactionLayer()
    now = 0.0
    requests: list[SipRequest] = []     # sent by us (client side)
    received: list[RequestReceived] = []
    n = 0
    for kind, status, tcp, step, pick in actions:
        transport = "tcp" if tcp else "udp"
        n += 1
        if kind in ("send", "send_invite"):
            req = _request("INVITE" if kind == "send_invite" else "MESSAGE", call_id=f"c{n}",
                           transport=transport.upper())
            layer.send_request(req, SRV_ADDR, transport, now)
            requests.append(req)
        elif kind == "respond_client" and requests:
            req = requests[pick % len(requests)]
            layer.receive(_answer(req, status), SRV_ADDR, transport, now)
        elif kind in ("receive", "receive_invite"):
            req = _request("INVITE" if kind == "receive_invite" else "MESSAGE", call_id=f"s{n}",
                           transport=transport.upper())
            for ev in layer.receive(_wire(req), DEV_ADDR, transport, now):
                if isinstance(ev, RequestReceived) and ev.transaction is not None:
                    received.append(ev)
        elif kind == "answer_server" and received:
            ev = received[pick % len(received)]
            assert ev.transaction is not None
            if not ev.transaction.answered and ev.transaction.state != "terminated":
                layer.send_response(ev.transaction, make_response(ev.request, status, to_tag="t"),
                                    now)
        elif kind == "ack" and received:
            ev = received[pick % len(received)]
            if ev.request.method == "INVITE":
                branch = ev.request.top_via.branch if pick % 2 else new_branch()
                assert branch is not None
                layer.receive(_ack(ev.request, to_tag="t", branch=branch), DEV_ADDR, transport, now)
        elif kind == "advance":
            now += step
            layer.handle_timer(now)
            # Everything due has fired.
            pending = _pending(layer)
            assert pending is None or pending > now
        layer.datagrams_to_send()
        assert layer.get_timer() == _pending(layer)
        # Every live transaction is in the right table and every terminated one is gone.
        assert all(isinstance(t, ClientTransaction) and t.state != "terminated"
                   for t in layer.client.values())
        assert all(t.state != "terminated" for t in layer.server.values())
    # Eventually everything ends, except INVITEs the TU never answered: the layer waits for
    # the TU there (it may take long to set up a stream) and has no timer of its own. An INVITE
    # that hit Timer B waits another 64·T1 for a late answer, so time passes twice.
    layer.handle_timer(now + 1000.0)
    layer.handle_timer(now + 2000.0)
    assert layer.client == {}
    assert all(t.method == "INVITE" and t.state == "proceeding" for t in layer.server.values())
    assert layer.get_timer() is None

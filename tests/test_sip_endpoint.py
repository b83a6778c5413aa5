"""SipEndpoint over real UDP and TCP sockets on 127.0.0.1 with ephemeral ports."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from gb28181.sip.endpoint import SipEndpoint, SipTimeoutError, SipTransportError
from gb28181.sip.framing import SipStreamFramer
from gb28181.sip.message import (
    SipRequest,
    SipResponse,
    make_response,
    new_branch,
    new_request,
    parse_message,
)
from gb28181.sip.transaction import RequestReceived

DEV = "34020000001320000001"
SRV = "34020000002000000001"
HOST = "127.0.0.1"
KEEPALIVE = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Notify>\n<CmdType>Keepalive</CmdType>\n'
             f"<SN>1</SN>\n<DeviceID>{DEV}</DeviceID>\n<Status>OK</Status>\n</Notify>\n").encode()
GUARD = 5.0  # no test waits longer than this for anything


async def _start(**kwargs) -> SipEndpoint:
    """Start an endpoint on an ephemeral port (retrying if the UDP port is taken on TCP)."""
    for _ in range(5):
        ep = SipEndpoint(HOST, 0, **kwargs)
        try:
            await ep.start()
            return ep
        except OSError:
            await ep.close()
    raise RuntimeError("could not bind an ephemeral SIP port")


class Server:
    """An endpoint answering every request with 200 (and recording what it saw)."""

    def __init__(self) -> None:
        self.seen: list[RequestReceived] = []
        self.ep: SipEndpoint

    def on_request(self, ev: RequestReceived) -> None:
        self.seen.append(ev)
        if ev.transaction is not None:
            self.ep.respond(ev.transaction, make_response(ev.request, 200, to_tag="srv"))


@pytest_asyncio.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()
    srv.ep = await _start(on_request=srv.on_request)
    yield srv
    await srv.ep.close()


@pytest_asyncio.fixture
async def client() -> AsyncIterator[SipEndpoint]:
    ep = await _start(t1=0.01)
    yield ep
    await ep.close()


def _message(ep: SipEndpoint, port: int, transport: str = "udp", *, call_id: str | None = None,
             method: str = "MESSAGE", body: bytes = KEEPALIVE) -> SipRequest:
    return new_request(method, f"sip:{SRV}@{HOST}:{port}", via=ep.via(transport),
                       from_uri=f"sip:{DEV}@3402000000", to_uri=f"sip:{SRV}@3402000000",
                       call_id=call_id, cseq=20, contact=f"sip:{DEV}@{HOST}:{ep.port}",
                       body=body, content_type="Application/MANSCDP+xml")


def _raw(port: int, *, call_id: str, transport: str = "UDP", cseq: str = "20 MESSAGE",
         body: bytes = b"", length: str | None = None, method: str = "MESSAGE") -> bytes:
    head = (
        f"{method} sip:{SRV}@{HOST}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} {HOST}:9;rport;branch={new_branch()}\r\n"
        f"From: <sip:{DEV}@3402000000>;tag=raw\r\n"
        f"To: <sip:{SRV}@3402000000>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq}\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n"
        "\r\n"
    )
    return head.encode() + body


class _Udp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.queue.put_nowait(data)


@pytest_asyncio.fixture
async def raw_udp() -> AsyncIterator[tuple[asyncio.DatagramTransport, _Udp]]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_Udp, local_addr=(HOST, 0))
    yield transport, proto
    transport.close()


async def _recv(proto: _Udp) -> SipResponse:
    data = await asyncio.wait_for(proto.queue.get(), GUARD)
    msg = parse_message(data)
    assert isinstance(msg, SipResponse)
    return msg


# -- requests and responses --------------------------------------------------------------------


async def test_message_over_udp(server: Server, client: SipEndpoint) -> None:
    req = _message(client, server.ep.port, "udp")
    resp = await asyncio.wait_for(client.request(req, (HOST, server.ep.port), "udp"), GUARD)
    assert resp.status == 200 and resp.call_id == req.call_id and resp.to_tag == "srv"
    assert resp.cseq == (20, "MESSAGE")
    (ev,) = server.seen
    assert ev.transport == "udp" and ev.addr == (HOST, client.port)
    assert ev.request.body == KEEPALIVE
    # The server filled in where the request really came from (rport/received).
    via = ev.request.top_via
    assert via.params["rport"] == str(client.port) and via.params["received"] == HOST
    assert client.layer.client == {} or all(t.state == "completed"
                                            for t in client.layer.client.values())


async def test_message_over_tcp(server: Server, client: SipEndpoint) -> None:
    addr = (HOST, server.ep.port)
    for _i in range(3):  # the second and third reuse the connection
        req = _message(client, server.ep.port, "tcp")
        resp = await asyncio.wait_for(client.request(req, addr, "tcp"), GUARD)
        assert resp.status == 200 and resp.call_id == req.call_id
    assert [ev.transport for ev in server.seen] == ["tcp"] * 3
    assert len({ev.addr for ev in server.seen}) == 1
    assert client.stats.tcp_connections == 1 and server.ep.stats.tcp_connections == 1
    # Over TCP transactions end with the final response.
    assert client.layer.client == {} and server.ep.layer.server == {}


async def test_on_provisional_and_late_final(client: SipEndpoint) -> None:
    async def answer_later(ep: SipEndpoint, ev: RequestReceived) -> None:
        await asyncio.sleep(0.05)
        assert ev.transaction is not None
        ep.respond(ev.transaction, make_response(ev.request, 486, "Busy Here", to_tag="b"))

    tasks: list[asyncio.Task] = []

    def on_request(ev: RequestReceived) -> None:
        if ev.transaction is None:
            return  # the ACK to our 486 is absorbed by the transaction layer, not seen here
        ep.respond(ev.transaction, make_response(ev.request, 180, to_tag="b"))
        tasks.append(asyncio.create_task(answer_later(ep, ev)))

    ep = await _start(on_request=on_request)
    try:
        provisional: list[SipResponse] = []
        invite = _message(client, ep.port, method="INVITE", body=b"v=0\r\n")
        resp = await asyncio.wait_for(
            client.request(invite, (HOST, ep.port), on_provisional=provisional.append), GUARD)
        assert [r.status for r in provisional] == [180] and resp.status == 486
        await asyncio.gather(*tasks)
    finally:
        await ep.close()


async def test_no_handler_answers_501(client: SipEndpoint) -> None:
    ep = await _start()
    try:
        resp = await asyncio.wait_for(
            client.request(_message(client, ep.port), (HOST, ep.port)), GUARD)
        assert resp.status == 501
    finally:
        await ep.close()


async def test_timeout_when_nothing_answers(client: SipEndpoint,
                                            raw_udp: tuple[asyncio.DatagramTransport, _Udp]) -> None:
    # A bound socket that never answers; with t1 = 0.01 Timer F fires after 0.64 s.
    sink, proto = raw_udp
    port = sink.get_extra_info("sockname")[1]
    req = _message(client, port)
    with pytest.raises(SipTimeoutError) as info:
        await asyncio.wait_for(client.request(req, (HOST, port)), GUARD)
    assert "MESSAGE" in str(info.value) and "None" not in str(info.value)
    assert isinstance(info.value, TimeoutError)
    # The request went out and was retransmitted (E doubles from 0.01 s) before giving up.
    got = []
    while not proto.queue.empty():
        got.append(proto.queue.get_nowait())
    assert len(got) >= 3 and len(set(got)) == 1
    assert client.layer.client == {}


async def test_explicit_timeout(client: SipEndpoint,
                                raw_udp: tuple[asyncio.DatagramTransport, _Udp]) -> None:
    port = raw_udp[0].get_extra_info("sockname")[1]
    with pytest.raises(SipTimeoutError, match="within 0.05 s"):
        await client.request(_message(client, port), (HOST, port), timeout=0.05)
    assert client.layer.client == {}


async def test_tcp_connect_refused(client: SipEndpoint,
                                   raw_udp: tuple[asyncio.DatagramTransport, _Udp]) -> None:
    # The raw socket holds a UDP port; nothing listens on TCP there.
    port = raw_udp[0].get_extra_info("sockname")[1]
    with pytest.raises(SipTransportError):
        await asyncio.wait_for(client.request(_message(client, port, "tcp"), (HOST, port), "tcp"),
                               GUARD)


# -- broken input ------------------------------------------------------------------------------


async def test_garbage_and_malformed_udp_get_400_and_endpoint_keeps_serving(
        server: Server, raw_udp: tuple[asyncio.DatagramTransport, _Udp]) -> None:
    sock, proto = raw_udp
    addr = (HOST, server.ep.port)
    for junk in (b"\x00\xff\xfe garbage", os.urandom(300), b"hello\r\n\r\n", b"SIP/2.0\r\n\r\n",
                 b"\r\n\r\n", b"MESSAGE sip:x SIP/2.0\r\nVia: nothing\r\n\r\n"):
        sock.sendto(junk, addr)
    # Enough headers to answer: Content-Length larger than the body.
    sock.sendto(_raw(server.ep.port, call_id="cut", body=b"short", length="500"), addr)
    resp = await _recv(proto)
    assert resp.status == 400 and resp.reason.startswith("Bad Request")
    assert "Content-Length" in resp.reason and resp.call_id == "cut"
    assert resp.cseq == (20, "MESSAGE")
    # CSeq method mismatch.
    sock.sendto(_raw(server.ep.port, call_id="mismatch", cseq="20 REGISTER"), addr)
    resp = await _recv(proto)
    assert resp.status == 400 and resp.call_id == "mismatch" and "CSeq" in resp.reason
    # Bad Content-Length value.
    sock.sendto(_raw(server.ep.port, call_id="badlen", length="abc"), addr)
    resp = await _recv(proto)
    assert resp.status == 400 and resp.call_id == "badlen"
    # None of that reached the application, and only the three got answers.
    assert server.seen == []
    assert server.ep.stats.parse_errors >= 8 and server.ep.stats.bad_requests_answered == 3
    # Still serving: a good request gets its 200.
    sock.sendto(_raw(server.ep.port, call_id="good", body=KEEPALIVE), addr)
    resp = await _recv(proto)
    assert resp.status == 200 and resp.call_id == "good"
    assert [ev.request.call_id for ev in server.seen] == ["good"]
    assert proto.queue.empty()


async def test_malformed_ack_gets_no_400(server: Server,
                                         raw_udp: tuple[asyncio.DatagramTransport, _Udp]) -> None:
    sock, proto = raw_udp
    addr = (HOST, server.ep.port)
    sock.sendto(_raw(server.ep.port, call_id="ack", method="ACK", cseq="1 ACK", length="99"), addr)
    sock.sendto(_raw(server.ep.port, call_id="after"), addr)
    resp = await _recv(proto)
    assert resp.status == 200 and resp.call_id == "after"


async def test_udp_retransmission_gets_same_answer(
        server: Server, raw_udp: tuple[asyncio.DatagramTransport, _Udp]) -> None:
    sock, proto = raw_udp
    data = _raw(server.ep.port, call_id="twice")
    sock.sendto(data, (HOST, server.ep.port))
    first = await asyncio.wait_for(proto.queue.get(), GUARD)
    sock.sendto(data, (HOST, server.ep.port))
    second = await asyncio.wait_for(proto.queue.get(), GUARD)
    assert first == second and len(server.seen) == 1


async def _tcp_responses(reader: asyncio.StreamReader, count: int) -> list[SipResponse]:
    framer = SipStreamFramer()
    out: list[SipResponse] = []
    while len(out) < count:
        chunk = await asyncio.wait_for(reader.read(65536), GUARD)
        assert chunk, "connection closed early"
        for raw in framer.feed(chunk):
            msg = parse_message(raw, stream=True)
            assert isinstance(msg, SipResponse)
            out.append(msg)
    return out


async def test_tcp_segment_with_three_requests(server: Server) -> None:
    reader, writer = await asyncio.open_connection(HOST, server.ep.port)
    try:
        segment = b"".join(_raw(server.ep.port, call_id=f"tcp-{i}", transport="TCP",
                                body=KEEPALIVE if i == 1 else b"") for i in range(3))
        writer.write(b"\r\n\r\n" + segment)
        await writer.drain()
        responses = await _tcp_responses(reader, 3)
        assert [r.status for r in responses] == [200, 200, 200]
        assert sorted(r.call_id for r in responses) == ["tcp-0", "tcp-1", "tcp-2"]
        assert [ev.request.call_id for ev in server.seen] == ["tcp-0", "tcp-1", "tcp-2"]
        assert server.seen[1].request.body == KEEPALIVE
        # The same connection also takes one request split over several writes.
        one = _raw(server.ep.port, call_id="split", transport="TCP", body=KEEPALIVE)
        for i in range(0, len(one), 37):
            writer.write(one[i:i + 37])
            await writer.drain()
        (resp,) = await _tcp_responses(reader, 1)
        assert resp.call_id == "split"
    finally:
        writer.close()


async def test_tcp_malformed_request_gets_400_on_the_connection(server: Server) -> None:
    reader, writer = await asyncio.open_connection(HOST, server.ep.port)
    try:
        writer.write(_raw(server.ep.port, call_id="tcp-bad", transport="TCP", cseq="7 BYE")
                     + _raw(server.ep.port, call_id="tcp-ok", transport="TCP"))
        responses = await _tcp_responses(reader, 2)
        assert [(r.status, r.call_id) for r in responses] == [(400, "tcp-bad"), (200, "tcp-ok")]
    finally:
        writer.close()


async def test_tcp_absurd_content_length_closes_connection(server: Server,
                                                           client: SipEndpoint) -> None:
    reader, writer = await asyncio.open_connection(HOST, server.ep.port)
    try:
        writer.write(_raw(server.ep.port, call_id="huge", transport="TCP", length="99999999999"))
        await writer.drain()
        data = await asyncio.wait_for(reader.read(65536), GUARD)
        assert data == b""  # closed without an answer
    finally:
        writer.close()
    assert server.seen == [] and server.ep.stats.parse_errors == 1
    # A fresh connection is served as usual.
    req = _message(client, server.ep.port, "tcp")
    resp = await asyncio.wait_for(client.request(req, (HOST, server.ep.port), "tcp"), GUARD)
    assert resp.status == 200


async def test_close_fails_pending_requests(client: SipEndpoint,
                                            raw_udp: tuple[asyncio.DatagramTransport, _Udp]) -> None:
    ep = await _start()
    port = raw_udp[0].get_extra_info("sockname")[1]
    task = asyncio.create_task(ep.request(_message(ep, port), (HOST, port)))
    await asyncio.wait_for(raw_udp[1].queue.get(), GUARD)  # it has been sent
    await ep.close()
    with pytest.raises(SipTransportError):
        await asyncio.wait_for(task, GUARD)

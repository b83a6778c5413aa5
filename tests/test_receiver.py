"""MediaReceiver (media.receiver): real sockets on 127.0.0.1, ephemeral ports.

UDP streams share one port and are told apart by SSRC; TCP comes in both roles
(we listen / we connect) and both framings (RFC 4571, `$`-interleaved).
"""

from __future__ import annotations

import asyncio
import random
import socket

import pytest
import pytest_asyncio

from media.ingest import RtpIngest
from media.packet import MediaPacket
from media.ps import PsMuxer
from media.receiver import MediaReceiver
from media.rtp import packetize
from media.rtp_tcp import frame_interleaved, frame_rfc4571

from .conftest import wait_for

# libx264 SPS/PPS for 64x48 (as in test_ps); the slices are filler without start codes.
SPS = bytes.fromhex("6764000aacd9447a1000000300100000030320f1225960")
PPS = bytes.fromhex("68ebe3cb22c0")
SC = b"\x00\x00\x00\x01"
HOST = "127.0.0.1"


def stream(ssrc: int, frames: int = 30, seed: int = 0, seq: int = 0) -> tuple[list[bytes], list[bytes]]:
    """(access units, RTP packets) of a small H.264 PS stream, GOP 10, ~3 packets per frame."""
    rng = random.Random(seed)
    muxer = PsMuxer("h264")
    aus, packets = [], []
    for i in range(frames):
        body = rng.randbytes(3000 if i % 10 == 0 else 2000).replace(b"\x00", b"\x01")
        if i % 10 == 0:
            au = SC + b"\x09\xf0" + SC + SPS + SC + PPS + SC + b"\x65\x88" + body
        else:
            au = SC + b"\x09\xf0" + SC + b"\x41\x9a" + body
        aus.append(au)
        ps = muxer.mux_video(au, i * 3600, None, i % 10 == 0)
        pk, seq = packetize(ps, ssrc=ssrc, seq=seq, timestamp=i * 3600)
        packets += pk
    return aus, packets


class Sink:
    """An ingest and what it handed over."""

    def __init__(self, expected_ssrc: int | None = None) -> None:
        self.out: list[MediaPacket] = []
        self.ingest = RtpIngest(self.out.append, expected_ssrc=expected_ssrc)

    @property
    def aus(self) -> list[bytes]:
        return [f.data for p in self.out for f in p.frames if f.stream == "video"]


@pytest_asyncio.fixture
async def receiver():
    r = MediaReceiver(HOST)
    await r.start()
    yield r
    await r.close()


@pytest.fixture
def udp_sender():
    socks = []

    def make(host: str = HOST) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((host, 0))
        socks.append(s)
        return s

    yield make
    for s in socks:
        s.close()


async def send_udp(sock: socket.socket, port: int, packets: list[bytes]) -> None:
    # Paced, so that the receiver (same event loop) drains the socket as we go.
    for i, p in enumerate(packets):
        sock.sendto(p, (HOST, port))
        if i % 8 == 7:
            await asyncio.sleep(0.001)


# -- UDP ---------------------------------------------------------------------------------


async def test_two_streams_on_the_shared_port_are_demultiplexed_by_ssrc(receiver, udp_sender) -> None:
    a, b = Sink(expected_ssrc=1001), Sink(expected_ssrc=1002)
    ha = receiver.expect_udp(1001, a.ingest)
    hb = receiver.expect_udp(1002, b.ingest, source_host=HOST)
    aus_a, pk_a = stream(1001, seed=1)
    aus_b, pk_b = stream(1002, seed=2, seq=40000)
    assert not ha.first_packet.is_set() and ha.transport == hb.transport == "udp"
    interleaved = [p for pair in zip(pk_a, pk_b) for p in pair]
    sock = udp_sender()
    await send_udp(sock, receiver.udp_port, interleaved)
    await asyncio.wait_for(ha.first_packet.wait(), 2)
    await wait_for(lambda: len(a.out) == 30 and len(b.out) == 30, 5, what="both streams")
    assert a.aus == aus_a and b.aus == aus_b
    assert ha.peer == hb.peer == sock.getsockname()
    assert not a.ingest.stats.ssrc_mismatch and not b.ingest.stats.ssrc_mismatch
    assert receiver.udp_packets == len(interleaved) and receiver.unknown_ssrc == 0
    assert receiver.udp_rcvbuf > 0 and receiver.as_dict()["udp_streams"] == 2
    with pytest.raises(ValueError):
        receiver.expect_udp(1001, Sink().ingest)


async def test_unknown_ssrc_falls_back_to_the_stream_waiting_for_that_host(receiver, udp_sender) -> None:
    other_host = Sink(expected_ssrc=2000)
    mine = Sink(expected_ssrc=2001)
    h_other = receiver.expect_udp(2000, other_host.ingest, source_host="192.0.2.7")
    h = receiver.expect_udp(2001, mine.ingest, source_host=HOST)
    aus, packets = stream(630886)  # the device ignored y= and uses its own SSRC
    await send_udp(udp_sender(), receiver.udp_port, packets)
    await wait_for(lambda: len(mine.out) == 30, 5, what="the fallback stream")
    assert mine.aus == aus and h.first_packet.is_set() and not h_other.first_packet.is_set()
    assert h.ssrcs == [2001, 630886] and receiver.ssrc_fallbacks == 1
    assert mine.ingest.stats.ssrc_mismatch and mine.ingest.learned_ssrc == 630886
    # The host has no stream waiting any more: a third SSRC from it is dropped.
    _, more = stream(777, frames=2)
    await send_udp(udp_sender(), receiver.udp_port, more)
    await wait_for(lambda: receiver.unknown_ssrc == len(more), 2, what="unknown SSRC count")
    assert receiver.unknown_ssrcs == {777: len(more)} and len(mine.out) == 30


async def test_unknown_ssrc_invalid_and_rtcp_are_counted_and_dropped(receiver, udp_sender) -> None:
    sink = Sink()
    receiver.expect_udp(5, sink.ingest)
    _, packets = stream(6, frames=3)
    rtcp_rr = bytes.fromhex("80c90001") + (6).to_bytes(4, "big")
    sock = udp_sender()
    await send_udp(sock, receiver.udp_port, packets + [b"\x80\x60", b"hello world, not rtp", rtcp_rr])
    await wait_for(lambda: receiver.unknown_ssrc + receiver.invalid + receiver.rtcp == len(packets) + 3, 2,
                   what="counters")
    assert (receiver.unknown_ssrc, receiver.invalid, receiver.rtcp) == (len(packets), 2, 1)
    assert not sink.out and receiver.udp_packets == 0


async def test_closed_stream_ssrc_is_not_taken_by_the_fallback(receiver, udp_sender) -> None:
    old, new = Sink(), Sink()
    h_old = receiver.expect_udp(3001, old.ingest, source_host=HOST)
    _, packets = stream(3001, frames=3)
    sock = udp_sender()
    await send_udp(sock, receiver.udp_port, packets)
    await wait_for(lambda: len(old.out) == 3, 2, what="the first stream")
    h_old.close()
    h_new = receiver.expect_udp(3002, new.ingest, source_host=HOST)
    await send_udp(sock, receiver.udp_port, packets)  # the device goes on after BYE
    await wait_for(lambda: receiver.stale == len(packets), 2, what="stale count")
    assert not h_new.first_packet.is_set() and receiver.ssrc_fallbacks == 0 and len(old.out) == 3


async def test_a_raising_consumer_does_not_break_the_receiver(receiver, udp_sender) -> None:
    def boom(packet: MediaPacket) -> None:
        raise RuntimeError("consumer bug")

    bad = RtpIngest(boom)
    good = Sink()
    receiver.expect_udp(11, bad)
    receiver.expect_udp(12, good.ingest)
    _, pk_bad = stream(11, frames=3)
    _, pk_good = stream(12, frames=3)
    await send_udp(udp_sender(), receiver.udp_port, pk_bad + pk_good)
    await wait_for(lambda: len(good.out) == 3, 2, what="the healthy stream")
    assert receiver.ingest_errors >= 1


# -- TCP passive ------------------------------------------------------------------------


async def _send_split(writer: asyncio.StreamWriter, data: bytes, rng: random.Random) -> None:
    pos = 0
    while pos < len(data):
        n = rng.randint(1, 3000)
        writer.write(data[pos : pos + n])
        await writer.drain()
        pos += n
        if rng.random() < 0.2:
            await asyncio.sleep(0)


async def test_tcp_passive_rfc4571_split_at_random_boundaries(receiver) -> None:
    sink = Sink()
    h = await receiver.listen_tcp(sink.ingest)
    assert h.transport == "tcp" and h.mode == "passive" and h.port > 0 and not h.connected
    aus, packets = stream(42)
    reader, writer = await asyncio.open_connection(HOST, h.port)
    await _send_split(writer, b"".join(frame_rfc4571(p) for p in packets), random.Random(5))
    await asyncio.wait_for(h.first_packet.wait(), 2)
    await wait_for(lambda: len(sink.out) == 30, 5, what="all frames over TCP")
    assert sink.aus == aus and h.connected and h.peer == writer.get_extra_info("sockname")
    assert h.framer is not None and h.framer.mode == "rfc4571" and h.framer.resyncs == 0
    writer.close()
    await wait_for(lambda: not h.connected, 2, what="disconnect")
    assert h.disconnects == {"eof": 1}


async def test_tcp_passive_reconnect_keeps_the_newest_connection(receiver) -> None:
    sink = Sink()
    h = await receiver.listen_tcp(sink.ingest)
    aus, packets = stream(43)
    half = len(packets) // 2
    r1, w1 = await asyncio.open_connection(HOST, h.port)
    w1.write(b"".join(frame_rfc4571(p) for p in packets[:half]))
    await w1.drain()
    await wait_for(lambda: h.packets == half, 2, what="first half")
    r2, w2 = await asyncio.open_connection(HOST, h.port)
    await wait_for(lambda: h.connections == 2, 2, what="second connection")
    assert h.disconnects == {"replaced": 1}
    assert await asyncio.wait_for(r1.read(), 2) == b""  # the old one was cut off
    await _send_split(w2, b"".join(frame_rfc4571(p) for p in packets[half:]), random.Random(6))
    await wait_for(lambda: len(sink.aus) == 30, 5, what="the rest over the new connection")
    assert sink.aus == aus and sink.ingest.stats.lost == 0
    w1.close()
    w2.close()


async def test_tcp_passive_refuses_other_hosts(receiver) -> None:
    h = await receiver.listen_tcp(Sink().ingest, source_host="192.0.2.9")
    reader, writer = await asyncio.open_connection(HOST, h.port)
    assert await asyncio.wait_for(reader.read(), 2) == b""
    assert h.rejected == 1 and not h.connected and h.connections == 0
    writer.close()


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 20000, random.Random(3).randbytes(400_000)],
                         ids=["text", "random"])
async def test_tcp_garbage_is_disconnected(receiver, garbage: bytes) -> None:
    sink = Sink()
    h = await receiver.listen_tcp(sink.ingest)
    reader, writer = await asyncio.open_connection(HOST, h.port)
    writer.write(garbage)
    try:
        await writer.drain()
    except ConnectionError:
        pass
    await wait_for(lambda: h.disconnects.get("garbage") == 1, 3, what="garbage disconnect")
    assert h.close_reason == "garbage" and not h.connected and not sink.out
    try:
        assert await asyncio.wait_for(reader.read(), 2) == b""
    except ConnectionError:
        pass
    writer.close()


# -- TCP active ---------------------------------------------------------------------------


async def test_tcp_active_connects_and_reads_interleaved_frames(receiver) -> None:
    aus, packets = stream(44, seq=65500)
    data = b"".join(frame_interleaved(p, 0) for p in packets)

    async def device(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _send_split(writer, data, random.Random(7))
        writer.close()

    server = await asyncio.start_server(device, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        sink = Sink()
        h = await receiver.connect_tcp(HOST, port, sink.ingest, timeout=2)
        assert h.mode == "active" and h.peer == (HOST, port)
        await asyncio.wait_for(h.first_packet.wait(), 2)
        await wait_for(lambda: len(sink.out) == 30, 5, what="frames from the device")
        await wait_for(lambda: not h.connected, 2, what="device closing")
        assert sink.aus == aus and h.disconnects == {"eof": 1} and h.framer is None
        h.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_tcp_active_connection_refused(receiver) -> None:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]  # nothing listens here
    with pytest.raises(OSError):
        await receiver.connect_tcp(HOST, port, Sink().ingest, timeout=2)


async def test_close_releases_everything(udp_sender) -> None:
    r = MediaReceiver(HOST, advertised_host="203.0.113.5")
    await r.start()
    assert r.advertised_host == "203.0.113.5" and r.udp_port > 0
    h = await r.listen_tcp(Sink().ingest)
    reader, writer = await asyncio.open_connection(HOST, h.port)
    await wait_for(lambda: h.connected, 2, what="connection")
    await r.close()
    assert h.closed and await asyncio.wait_for(reader.read(), 2) == b""
    with pytest.raises(OSError):
        await asyncio.open_connection(HOST, h.port)
    writer.close()

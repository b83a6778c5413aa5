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

from media import accel
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


_C = accel.fast


@pytest.fixture(params=["c", "python"])
def receive_path(request, monkeypatch) -> str:
    """Every receiver test runs on both receive paths: the C twin (media._fast: batched
    recvmmsg and the in-order fast path in C) and the pure-Python one it stands in for."""
    if request.param == "c" and _C is None:
        pytest.skip("media._fast is not built here (no C compiler at install)")
    monkeypatch.setattr(accel, "fast", _C if request.param == "c" else None)
    return request.param


@pytest_asyncio.fixture
async def receiver(receive_path):
    r = MediaReceiver(HOST)
    await r.start()
    yield r
    await r.close()


@pytest.fixture
def udp_sender(receive_path):
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



# -- SSRCs of the answer (add_ssrc) -------------------------------------------------------


@pytest.mark.parametrize("answers", ["a-then-b", "b-then-a"])
async def test_answered_ssrcs_of_two_streams_of_one_host_never_swap(receiver, udp_sender, answers: str) -> None:
    # Two INVITEs to one NVR; each 200 carries a y= of the NVR's own choosing, and the
    # second stream's RTP is first to arrive: the oldest-waiting fallback would swap them.
    a, b = Sink(), Sink()
    ha = receiver.expect_udp(200000001, a.ingest, source_host=HOST)
    hb = receiver.expect_udp(200000002, b.ingest, source_host=HOST)
    if answers == "a-then-b":
        assert ha.add_ssrc(1101) and hb.add_ssrc(1102)
    else:
        assert hb.add_ssrc(1102) and ha.add_ssrc(1101)
    aus_a, pk_a = stream(1101, frames=12, seed=1)
    aus_b, pk_b = stream(1102, frames=12, seed=2)
    sock = udp_sender()
    await send_udp(sock, receiver.udp_port, pk_b)
    await wait_for(lambda: len(b.out) == 12, 5, what="the second stream")
    assert not ha.first_packet.is_set() and not a.out
    await send_udp(sock, receiver.udp_port, pk_a)
    await wait_for(lambda: len(a.out) == 12, 5, what="the first stream")
    assert a.aus == aus_a and b.aus == aus_b
    assert ha.ssrcs == [200000001, 1101] and hb.ssrcs == [200000002, 1102]
    assert receiver.ssrc_fallbacks == 0 and receiver.unknown_ssrc == 0


async def test_a_claim_takes_back_an_ssrc_that_the_fallback_guessed(receiver, udp_sender) -> None:
    # The second stream's RTP arrives before its 200 is handled: the guess gives it to the
    # first stream, and the answer's claim takes it back.
    a, b = Sink(), Sink()
    ha = receiver.expect_udp(200000011, a.ingest, source_host=HOST)
    hb = receiver.expect_udp(200000012, b.ingest, source_host=HOST)
    aus_a, pk_a = stream(1201, frames=10, seed=1)
    aus_b, pk_b = stream(1202, frames=20, seed=2)
    sock = udp_sender()
    early = [p for p in pk_b if int.from_bytes(p[4:8], "big") < 10 * 3600]  # frames 0-9
    await send_udp(sock, receiver.udp_port, early)
    await wait_for(lambda: ha.first_packet.is_set(), 2, what="the guess")
    assert receiver.ssrc_fallbacks == 1 and ha.ssrcs == [200000011, 1202]
    assert hb.add_ssrc(1202) and ha.add_ssrc(1201)
    assert ha.ssrcs == [200000011, 1201] and not ha.first_packet.is_set() and ha.peer is None
    assert receiver.ssrc_revoked == 1
    await send_udp(sock, receiver.udp_port, pk_b[len(early):] + pk_a)
    await wait_for(lambda: len(b.aus) == 10 and a.aus[-10:] == aus_a, 5, what="both streams")
    assert b.aus == aus_b[10:]
    assert set(a.aus[:-10]) <= set(aus_b[:10])  # what the guess gave it, then its own
    assert ha.first_packet.is_set() and hb.first_packet.is_set() and receiver.ssrc_fallbacks == 1


async def test_add_ssrc_does_not_steal_and_close_releases(receiver, udp_sender) -> None:
    a, b = Sink(), Sink()
    ha = receiver.expect_udp(1301, a.ingest, source_host=HOST)
    hb = receiver.expect_udp(1302, b.ingest, source_host=HOST)
    assert ha.add_ssrc(1311) and ha.add_ssrc(1311) and ha.add_ssrc(1301)
    assert not hb.add_ssrc(1311) and not hb.add_ssrc(1301)  # owned by a live stream
    assert hb.ssrcs == [1302]
    _, pk = stream(1311, frames=2)
    sock = udp_sender()
    await send_udp(sock, receiver.udp_port, pk)
    await wait_for(lambda: ha.packets == len(pk), 2, what="routing to the owner")
    assert hb.packets == 0 and not hb.first_packet.is_set()
    ha.close()
    assert not ha.add_ssrc(1399)
    await send_udp(sock, receiver.udp_port, pk)  # retired: not guessed for the waiting stream
    await wait_for(lambda: receiver.stale == len(pk), 2, what="stale count")
    assert not hb.first_packet.is_set()
    assert hb.add_ssrc(1311)  # released: a new claim may have it at once
    await send_udp(sock, receiver.udp_port, pk)
    await wait_for(lambda: hb.packets == len(pk), 2, what="routing to the new owner")
    with pytest.raises(ValueError):
        receiver.expect_udp(1311, Sink().ingest)


async def test_fallback_skips_ssrcs_claimed_by_tcp_and_streams_that_answered(receiver, udp_sender) -> None:
    a, b = Sink(), Sink()
    ha = receiver.expect_udp(1401, a.ingest, source_host=HOST)
    hb = receiver.expect_udp(1402, b.ingest, source_host=HOST)
    ht = await receiver.listen_tcp(Sink().ingest, ssrc=1403)
    assert ht.add_ssrc(1404)
    assert ha.add_ssrc(1411)  # the older stream's answer named its SSRC
    sock = udp_sender()
    _, claimed = stream(1404, frames=2)
    await send_udp(sock, receiver.udp_port, claimed)
    await wait_for(lambda: receiver.unknown_ssrc == len(claimed), 2, what="claimed SSRC dropped")
    _, unknown = stream(630886, frames=2)
    await send_udp(sock, receiver.udp_port, unknown)
    await wait_for(lambda: hb.first_packet.is_set(), 2, what="the guess")
    assert hb.ssrcs == [1402, 630886] and not ha.first_packet.is_set() and receiver.ssrc_fallbacks == 1


# -- TCP passive ------------------------------------------------------------------------


def rfc4571(packets: list[bytes]) -> bytes:
    return b"".join(frame_rfc4571(p) for p in packets)


async def device(port: int, local: str = HOST) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A device connecting to our media port from `local` (a media NIC, another host)."""
    return await asyncio.open_connection(HOST, port, local_addr=(local, 0))


def free_tcp_range(n: int) -> tuple[int, int]:
    """n consecutive TCP ports free on HOST, below the ephemeral range."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - n)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                socks.append(socket.socket())
                socks[-1].bind((HOST, port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base, base + n - 1
    raise RuntimeError("no free TCP port range")


@pytest_asyncio.fixture
async def shared():
    """A receiver whose passive TCP streams share ports from a range of three."""
    lo, hi = free_tcp_range(3)
    r = MediaReceiver(HOST, tcp_port_range=(lo, hi), tcp_pending_timeout=0.5, tcp_pending_max=3)
    await r.start()
    yield r
    await r.close()


@pytest_asyncio.fixture
async def one_port():
    """A receiver whose passive TCP streams all share one port."""
    lo, _ = free_tcp_range(1)
    r = MediaReceiver(HOST, tcp_port_range=(lo, lo))
    await r.start()
    yield r
    await r.close()


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
    h = await receiver.listen_tcp(sink.ingest, ssrc=42)
    assert h.transport == "tcp" and h.mode == "passive" and h.port > 0 and not h.connected
    assert h.waiting and receiver.as_dict()["tcp_ports"] == {h.port: 1}
    aus, packets = stream(42)
    reader, writer = await device(h.port)
    await _send_split(writer, rfc4571(packets), random.Random(5))
    await asyncio.wait_for(h.first_packet.wait(), 2)
    await wait_for(lambda: len(sink.out) == 30, 5, what="all frames over TCP")
    assert sink.aus == aus and h.connected and h.peer == writer.get_extra_info("sockname")
    assert h.framer is not None and h.framer.mode == "rfc4571" and h.framer.resyncs == 0
    assert not h.waiting and not sink.ingest.stats.ssrc_mismatch
    writer.close()
    await wait_for(lambda: not h.connected, 2, what="disconnect")
    assert h.disconnects == {"eof": 1}


async def test_tcp_passive_accepts_any_address_and_keeps_the_first_bytes(receiver) -> None:
    # The NVR signals from one address and sends media from another NIC.
    sink = Sink(expected_ssrc=77)
    h = await receiver.listen_tcp(sink.ingest, ssrc=77, source_host="192.0.2.9")
    aus, packets = stream(77)
    reader, writer = await device(h.port, local="127.0.0.2")
    writer.write(rfc4571(packets))  # one write: the packets read while pending are the first ones
    await wait_for(lambda: len(sink.out) == 30, 5, what="all frames")
    assert sink.aus == aus and h.peer[0] == "127.0.0.2" and h.connections == 1
    assert receiver.as_dict()["tcp_unbound"] == {} and receiver.as_dict()["tcp_pending"] == 0
    writer.close()


async def test_tcp_passive_reconnect_keeps_the_newest_connection(receiver) -> None:
    sink = Sink()
    h = await receiver.listen_tcp(sink.ingest, ssrc=43)
    aus, packets = stream(43)
    half = len(packets) // 2
    r1, w1 = await device(h.port)
    w1.write(rfc4571(packets[:half]))
    await w1.drain()
    await wait_for(lambda: h.packets == half, 2, what="first half")
    r2, w2 = await device(h.port, local="127.0.0.3")
    await _send_split(w2, rfc4571(packets[half:]), random.Random(6))
    await wait_for(lambda: h.connections == 2 and h.disconnects == {"replaced": 1}, 2, what="second connection")
    assert h.peer[0] == "127.0.0.3"
    assert await asyncio.wait_for(r1.read(), 2) == b""  # the old one was cut off
    await wait_for(lambda: len(sink.aus) == 30, 5, what="the rest over the new connection")
    assert sink.aus == aus and sink.ingest.stats.lost == 0
    w1.close()
    w2.close()


async def test_tcp_passive_streams_share_a_port_and_are_told_apart_by_ssrc(one_port) -> None:
    r = one_port
    a, b = Sink(), Sink()
    ha = await r.listen_tcp(a.ingest, ssrc=501)
    hb = await r.listen_tcp(b.ingest, ssrc=502)
    assert ha.port == hb.port and r.as_dict()["tcp_ports"] == {ha.port: 2}
    aus_a, pk_a = stream(501, frames=10, seed=1)
    aus_b, pk_b = stream(502, frames=10, seed=2)
    # The second stream's device connects first, from another address.
    rb, wb = await device(hb.port, local="127.0.0.4")
    wb.write(rfc4571(pk_b))
    await wait_for(lambda: len(b.out) == 10, 5, what="the second stream")
    assert not ha.connected and ha.waiting and not a.out
    ra, wa = await device(ha.port, local="127.0.0.3")
    await _send_split(wa, rfc4571(pk_a), random.Random(8))
    await wait_for(lambda: len(a.out) == 10, 5, what="the first stream")
    assert a.aus == aus_a and b.aus == aus_b
    assert ha.peer[0] == "127.0.0.3" and hb.peer[0] == "127.0.0.4"
    assert r.as_dict()["tcp_ssrc_fallbacks"] == 0 and r.as_dict()["tcp_unbound"] == {}
    wa.close()
    wb.close()


@pytest.mark.parametrize("answers", ["a-then-b", "b-then-a"])
async def test_tcp_passive_answered_ssrcs_on_a_shared_port(one_port, answers: str) -> None:
    shared = one_port
    a, b = Sink(), Sink()
    ha = await shared.listen_tcp(a.ingest, ssrc=200000021)
    hb = await shared.listen_tcp(b.ingest, ssrc=200000022)
    assert ha.port == hb.port
    for h, answer in ([(ha, 1521), (hb, 1522)] if answers == "a-then-b" else [(hb, 1522), (ha, 1521)]):
        assert h.add_ssrc(answer)
    assert not ha.add_ssrc(1522)  # the other stream's answer
    aus_a, pk_a = stream(1521, frames=6, seed=1)
    aus_b, pk_b = stream(1522, frames=6, seed=2)
    rb, wb = await device(hb.port, local="127.0.0.4")
    wb.write(rfc4571(pk_b))
    await wait_for(lambda: len(b.out) == 6, 5, what="the second stream")
    ra, wa = await device(ha.port, local="127.0.0.4")
    wa.write(rfc4571(pk_a))
    await wait_for(lambda: len(a.out) == 6, 5, what="the first stream")
    assert a.aus == aus_a and b.aus == aus_b and shared.as_dict()["tcp_ssrc_fallbacks"] == 0
    wa.close()
    wb.close()


async def test_tcp_passive_port_choice_skips_ports_in_use_and_closes_idle_listeners() -> None:
    lo, hi = free_tcp_range(3)
    squatter = socket.socket()
    squatter.bind((HOST, lo))
    squatter.listen()
    r = MediaReceiver(HOST, tcp_port_range=(lo, hi))
    await r.start()
    try:
        h1 = await r.listen_tcp(Sink().ingest, ssrc=601)
        h2 = await r.listen_tcp(Sink().ingest, ssrc=602)
        assert (h1.port, h2.port) == (lo + 1, lo + 2)  # lo is taken by someone else
        h3 = await r.listen_tcp(Sink().ingest, ssrc=603)  # no free port left: shares one
        assert h3.port == lo + 1
        reader, writer = await device(h2.port)
        writer.write(rfc4571(stream(602, frames=2)[1]))
        await wait_for(lambda: h2.connected, 2, what="the second stream")
        h4 = await r.listen_tcp(Sink().ingest, ssrc=604)
        assert h4.port == lo + 2  # the port with the fewest streams waiting
        assert r.as_dict()["tcp_ports"] == {lo + 1: 2, lo + 2: 2}
        h2.close()
        h4.close()
        with pytest.raises(OSError):
            await device(lo + 2)  # its last stream went away: the port is closed
        h5 = await r.listen_tcp(Sink().ingest, ssrc=605)
        assert h5.port == lo + 2  # reopened
        for h in (h1, h3, h5):
            h.close()
        assert r.as_dict()["tcp_ports"] == {} and r.as_dict()["tcp_streams"] == 0
        writer.close()
    finally:
        await r.close()
    r = MediaReceiver(HOST, tcp_port_range=(lo, lo))
    await r.start()
    try:
        with pytest.raises(OSError):
            await r.listen_tcp(Sink().ingest, ssrc=606)
        assert r.as_dict()["tcp_streams"] == 0
        assert r.expect_udp(606, Sink().ingest)  # the failed stream's SSRC was released
    finally:
        await r.close()
        squatter.close()


async def test_tcp_passive_unknown_ssrc_goes_to_the_one_waiting_stream(shared) -> None:
    a, b = Sink(expected_ssrc=701), Sink(expected_ssrc=702)
    ha = await shared.listen_tcp(a.ingest, ssrc=701)
    _, pk_a = stream(701, frames=3, seed=1)
    ra, wa = await device(ha.port)
    wa.write(rfc4571(pk_a))
    await wait_for(lambda: len(a.out) == 3, 5, what="the first stream")
    hb = await shared.listen_tcp(b.ingest, ssrc=702)
    assert hb.port == ha.port
    aus, pk_b = stream(630886, frames=10, seed=2)  # the device ignored y=
    rb, wb = await device(hb.port, local="127.0.0.2")
    wb.write(rfc4571(pk_b[:1]))  # one packet is no evidence yet: held
    await wb.drain()
    await asyncio.sleep(0.05)
    assert not hb.connected and shared.as_dict()["tcp_pending"] == 1
    wb.write(rfc4571(pk_b[1:]))
    await wait_for(lambda: len(b.out) == 10, 5, what="the mismatched stream")
    assert b.aus == aus and b.ingest.stats.ssrc_mismatch and hb.ssrcs == [702, 630886]
    assert shared.as_dict()["tcp_ssrc_fallbacks"] == 1 and not a.ingest.stats.ssrc_mismatch
    # A reconnect of that device is recognised by its SSRC.
    rb2, wb2 = await device(hb.port, local="127.0.0.2")
    wb2.write(rfc4571(stream(630886, frames=1, seq=5000)[1]))
    await wait_for(lambda: hb.connections == 2, 2, what="the reconnect")
    for w in (wa, wb, wb2):
        w.close()


async def test_tcp_passive_ambiguous_stale_and_claimed_ssrcs_are_closed(shared) -> None:
    ha = await shared.listen_tcp(Sink().ingest, ssrc=801)
    _, pk_a = stream(801, frames=2)
    ra, wa = await device(ha.port)
    wa.write(rfc4571(pk_a))
    await wait_for(lambda: ha.connected, 2, what="the first stream")
    port = ha.port
    ha.close()  # BYE; the device goes on
    # Four streams on three ports: two wait on the first port, reopened.
    hb, hc, hd, he = [await shared.listen_tcp(Sink().ingest, ssrc=s) for s in (802, 803, 805, 806)]
    assert hb.port == he.port == port and len({hb.port, hc.port, hd.port}) == 3
    shared.expect_udp(804, Sink().ingest)
    cases = [
        (pk_a, "stale"),  # the closed stream's device goes on
        (stream(804, frames=2)[1], "claimed"),  # another stream's SSRC
        (stream(999, frames=2)[1], "unmatched"),  # hb or he? cannot tell
    ]
    for packets, why in cases:
        reader, writer = await device(port)
        writer.write(rfc4571(packets))
        assert await asyncio.wait_for(reader.read(), 2) == b""
        assert shared.as_dict()["tcp_unbound"].get(why) == 1
        writer.close()
    assert not any(h.connected for h in (hb, hc, hd, he))
    assert all(h.waiting for h in (hb, hc, hd, he))
    wa.close()


async def test_tcp_passive_pending_connections_are_bounded(shared) -> None:
    sink = Sink()
    h = await shared.listen_tcp(sink.ingest, ssrc=901)
    idle = [await device(h.port) for _ in range(4)]  # the limit is 3: the oldest goes
    assert await asyncio.wait_for(idle[0][0].read(), 2) == b""
    await wait_for(lambda: shared.as_dict()["tcp_unbound"] == {"overflow": 1, "timeout": 3}, 3,
                   what="pending timeouts")
    assert h.waiting and shared.as_dict()["tcp_pending"] == 0
    aus, packets = stream(901, frames=3)
    reader, writer = await device(h.port)
    writer.write(rfc4571(packets))
    await wait_for(lambda: len(sink.out) == 3, 2, what="the real device")
    # The port's last stream going away closes what still waits on it.
    r2, w2 = await device(h.port)
    await wait_for(lambda: shared.as_dict()["tcp_pending"] == 1, 2, what="a pending connection")
    h.close()
    assert await asyncio.wait_for(r2.read(), 2) == b""
    await wait_for(lambda: shared.as_dict()["tcp_unbound"].get("closed") == 1, 2, what="closed count")
    for _, w in idle + [(reader, writer), (r2, w2)]:
        w.close()


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 20000, random.Random(3).randbytes(400_000)],
                         ids=["text", "random"])
@pytest.mark.parametrize("after_rtp", [False, True], ids=["pending", "tied"])
async def test_tcp_garbage_is_disconnected(receiver, garbage: bytes, after_rtp: bool) -> None:
    sink = Sink()
    h = await receiver.listen_tcp(sink.ingest, ssrc=45)
    reader, writer = await device(h.port)
    if after_rtp:
        writer.write(rfc4571(stream(45, frames=2)[1]))
        await wait_for(lambda: h.connected, 2, what="the stream")
    writer.write(garbage)
    try:
        await writer.drain()
    except ConnectionError:
        pass
    if after_rtp:
        await wait_for(lambda: h.disconnects.get("garbage") == 1, 3, what="garbage disconnect")
        assert h.close_reason == "garbage" and not h.connected and len(sink.out) <= 2
    else:
        await wait_for(lambda: receiver.as_dict()["tcp_unbound"].get("garbage") == 1, 3, what="garbage count")
        assert h.waiting and h.connections == 0 and not sink.out
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
        h = await receiver.connect_tcp(HOST, port, sink.ingest, timeout=2, ssrc=44)
        assert h.mode == "active" and h.peer == (HOST, port) and h.ssrcs == [44]
        await asyncio.wait_for(h.first_packet.wait(), 2)
        await wait_for(lambda: len(sink.out) == 30, 5, what="frames from the device")
        await wait_for(lambda: not h.connected, 2, what="device closing")
        assert sink.aus == aus and h.disconnects == {"eof": 1} and h.framer is None
        h.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_tcp_active_falls_back_to_the_next_address(receiver) -> None:
    # The answer's c= is not reachable (here: nothing listens on 127.0.0.2); the
    # device's signalling address is.
    aus, packets = stream(46, frames=3)

    async def device(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(rfc4571(packets))
        await writer.drain()

    server = await asyncio.start_server(device, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        sink = Sink()
        h = await receiver.connect_tcp(["0.0.0.0", "127.0.0.2", HOST, "127.0.0.2"], port, sink.ingest, timeout=2)
        assert h.peer == (HOST, port)
        await wait_for(lambda: len(sink.out) == 3, 5, what="frames from the device")
        h.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_tcp_active_connection_refused_names_every_address(receiver) -> None:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]  # nothing listens here
    with pytest.raises(OSError) as err:
        await receiver.connect_tcp(["127.0.0.2", HOST], port, Sink().ingest, timeout=2, ssrc=47)
    assert f"127.0.0.2:{port}" in str(err.value) and f"{HOST}:{port}" in str(err.value)
    assert receiver.as_dict()["tcp_streams"] == 0
    with pytest.raises(OSError):
        await receiver.connect_tcp(HOST, port, Sink().ingest, timeout=2, ssrc=47)  # SSRC free again


async def test_close_releases_everything(udp_sender) -> None:
    r = MediaReceiver(HOST, advertised_host="203.0.113.5")
    await r.start()
    assert r.advertised_host == "203.0.113.5" and r.udp_port > 0
    h = await r.listen_tcp(Sink().ingest, ssrc=48)
    hp = await r.listen_tcp(Sink().ingest, ssrc=49)
    hu = r.expect_udp(50, Sink().ingest, source_host=HOST)
    reader, writer = await device(h.port)
    writer.write(rfc4571(stream(48, frames=2)[1]))
    await wait_for(lambda: h.connected, 2, what="connection")
    r2, w2 = await device(hp.port)  # still pending
    await wait_for(lambda: r.as_dict()["tcp_pending"] == 1, 2, what="pending connection")
    await r.close()
    assert h.closed and hp.closed and hu.closed and await asyncio.wait_for(reader.read(), 2) == b""
    assert await asyncio.wait_for(r2.read(), 2) == b""
    with pytest.raises(OSError):
        await asyncio.open_connection(HOST, h.port)
    d = r.as_dict()
    assert (d["udp_streams"], d["tcp_streams"], d["tcp_ports"], d["tcp_pending"]) == (0, 0, {}, 0)
    writer.close()
    w2.close()


# -- the C twin against the Python path ------------------------------------------------------


def _impair(packets: list[bytes], how: str, rng: random.Random) -> list[bytes]:
    out = list(packets)
    if how == "loss":  # a few packets never arrive: withheld until the next keyframe
        for i in sorted(rng.sample(range(5, len(out)), 6), reverse=True):
            del out[i]
    elif how == "duplicates":
        for i in sorted(rng.sample(range(len(out)), 8), reverse=True):
            out.insert(i + 1, out[i])
    elif how == "reorder":
        for i in rng.sample(range(1, len(out) - 2), 8):
            out[i], out[i + 1] = out[i + 1], out[i]
    elif how == "ssrc_change":  # a restarted sender: a new SSRC and new sequence numbers mid-stream
        half = len(out) // 2
        _, again = stream(0x7777, frames=20, seed=9, seq=40000)
        out = out[:half] + again
    return out


@pytest.mark.parametrize("how", ["in_order", "loss", "duplicates", "reorder", "ssrc_change", "garbage"])
async def test_the_c_receive_path_hands_over_exactly_what_the_python_one_does(monkeypatch, how) -> None:
    """Two interleaved streams with an impairment, sent in bursts (so the C path gets real
    batches, markers and mismatches in the middle of them) to a receiver on each path: the
    frames handed over, every counter and the routing must be the same."""
    if _C is None:
        pytest.skip("media._fast is not built here (no C compiler at install)")
    rng = random.Random(how)
    a_pk = _impair(stream(1111, frames=40, seed=1)[1], how, rng)
    b_pk = stream(2222, frames=40, seed=2, seq=65500)[1]  # wraps its sequence numbers
    mixed: list[bytes] = []
    bursts: list[int] = []  # where the sender pauses
    while a_pk or b_pk:
        for src in (a_pk, b_pk):
            take = rng.randint(1, 5)
            mixed += src[:take]
            del src[:take]
        if len(mixed) - (bursts[-1] if bursts else 0) >= 40:
            bursts.append(len(mixed))
    if how == "in_order":  # a camera's pacing: a pause after every frame's last packet
        bursts = [i + 1 for i, p in enumerate(mixed) if p[1] & 0x80]
    if how == "garbage":  # not RTP, RTCP, and a header with an extension: all through Python
        ext = bytearray(mixed[3])
        ext[0] |= 0x10
        mixed[3:3] = [b"\x00" * 20, b"\x80\xc8" + b"\x00" * 26, bytes(ext)]
    extra = 0x7777 if how == "ssrc_change" else None
    results, taken = await _on_both_paths(monkeypatch, mixed, bursts, extra_ssrc=extra)
    assert results["c"] == results["python"]
    assert results["c"][0] and results["c"][1]
    # The C path really ran. A lane stands down after its frame's marker or a packet off its
    # fast path until Python has caught up (the next batch), so with small frames in big
    # bursts it takes a share; with a camera's pacing (a burst a frame) nearly all.
    assert taken["python"] == 0
    assert taken["c"] > (len(mixed) * 3 // 4 if how == "in_order" else 0), (taken, len(mixed))


async def _on_both_paths(monkeypatch, mixed: list[bytes], bursts: list[int],
                         extra_ssrc: int | None = None) -> tuple[dict, dict]:
    """Send `mixed` (pausing after each index in `bursts`) to a receiver on the C path and
    to one on the Python path, streams 1111 (answer adds `extra_ssrc`) and 2222; what each
    handed over and counted, and how many packets the C lanes took."""
    results: dict = {}
    taken: dict = {}
    for path in ("c", "python"):
        monkeypatch.setattr(accel, "fast", _C if path == "c" else None)
        r = MediaReceiver(HOST)
        await r.start()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            a, b = Sink(1111), Sink(2222)
            ha = r.expect_udp(1111, a.ingest, source_host=HOST)
            hb = r.expect_udp(2222, b.ingest)
            if extra_ssrc is not None:
                ha.add_ssrc(extra_ssrc)
            sock.bind((HOST, 0))
            pauses = set(bursts)
            for i, p in enumerate(mixed):
                sock.sendto(p, (HOST, r.udp_port))
                if i + 1 in pauses:
                    await asyncio.sleep(0.002)
            await wait_for(lambda r=r: r.udp_packets + r.invalid + r.rtcp + r.unknown_ssrc + r.stale >= len(mixed),
                           what="every datagram")
            a.ingest.flush()
            b.ingest.flush()
            keys = ("packets", "bytes", "invalid", "frames", "keyframes", "delivered", "lost", "reordered",
                    "duplicates", "late", "damaged_frames", "dropped_until_keyframe", "ssrc_changes")
            results[path] = (
                [(p.timestamp, p.keyframe, p.ps) for p in a.out],
                [(p.timestamp, p.keyframe, p.ps) for p in b.out],
                [getattr(a.ingest.stats, k) for k in keys],
                [getattr(b.ingest.stats, k) for k in keys],
                (ha.packets, hb.packets, r.udp_packets, r.invalid, r.rtcp, r.unknown_ssrc),
            )
            taken[path] = (ha.lane.total + hb.lane.total) if ha.lane is not None else 0
        finally:
            sock.close()
            await r.close()
    return results, taken


@pytest.mark.parametrize("seed", range(4))
async def test_the_two_receive_paths_agree_on_mutated_datagrams(monkeypatch, seed: int) -> None:
    """Differential fuzz: real streams with random header bytes, truncations, marker bits,
    sequence jumps and duplicates (SSRCs mostly kept, so the lanes see them): neither path
    crashes or stalls, and both hand over and count exactly the same."""
    if _C is None:
        pytest.skip("media._fast is not built here (no C compiler at install)")
    rng = random.Random(seed)
    mixed = []
    for p in stream(1111, frames=30, seed=seed)[1] + stream(2222, frames=30, seed=seed + 9)[1]:
        roll = rng.random()
        if roll < 0.06:  # a random header byte (not the SSRC)
            p = bytearray(p)
            p[rng.choice((0, 1, 2, 3, 4, 5, 6, 7))] = rng.randrange(256)
            p = bytes(p)
        elif roll < 0.09:  # cut short, down to nothing
            p = p[: rng.randrange(len(p))]
        elif roll < 0.12:  # the marker bit flipped
            p = p[:1] + bytes([p[1] ^ 0x80]) + p[2:]
        elif roll < 0.14:  # payload garbage
            p = p[:12] + rng.randbytes(len(p) - 12)
        mixed.append(p)
        if rng.random() < 0.03:
            mixed.append(p)
    chunk = mixed[40:60]  # and a stretch out of order
    rng.shuffle(chunk)
    mixed[40:60] = chunk
    bursts = sorted(rng.sample(range(1, len(mixed)), 15))
    results, taken = await _on_both_paths(monkeypatch, mixed, bursts)
    assert results["c"] == results["python"]
    assert taken["c"] > 0 and taken["python"] == 0

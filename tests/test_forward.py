"""RTP/PS forwarding (cascade): UDP and TCP (RFC 4571) to local sockets."""

from __future__ import annotations

import asyncio
import time

import pytest

from media.forward import RtpForwarder
from media.hub import Stream
from media.packet import MediaPacket
from media.ps import PsDemuxer
from media.rtp import RtpPacket, parse_rtp
from media.rtp_tcp import TcpRtpFramer

from .test_hub import N_FRAMES, encode, make_packets

SSRC = 200000123  # the y= value negotiated with the upper platform


class _Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.datagrams: list[bytes] = []

    def datagram_received(self, data: bytes, addr) -> None:
        self.datagrams.append(data)


async def udp_receiver() -> tuple[asyncio.DatagramTransport, _Collector, int]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_Collector, local_addr=("127.0.0.1", 0))
    return transport, proto, transport.get_extra_info("sockname")[1]


class TcpReceiver:
    """A TCP listener collecting the bytes of every connection."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        while chunk := await reader.read(65536):
            self.data += chunk

    async def close(self) -> None:
        for w in self.writers:
            w.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def wait_until(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def expected_rtp_count(packets: list[MediaPacket], mtu: int = 1400) -> int:
    return sum(-(-len(p.ps) // (mtu - 12)) for p in packets)


def check_rtp(wire: list[bytes], packets: list[MediaPacket], mtu: int = 1400) -> None:
    """Everything the upper platform checks: header fields, seq, markers, sizes, PS content."""
    rtp: list[RtpPacket] = [parse_rtp(d) for d in wire]
    assert len(rtp) == expected_rtp_count(packets, mtu)
    assert all(len(d) <= mtu for d in wire)
    assert {(r.ssrc, r.payload_type, r.version) for r in rtp} == {(SSRC, 96, 2)}
    assert all(not r.padding and r.extension is None and not r.csrc for r in rtp)
    for a, b in zip(rtp, rtp[1:]):
        assert b.sequence == (a.sequence + 1) & 0xFFFF
    # Group by timestamp: one group per PS packet, the marker on its last RTP packet only.
    groups: list[list[RtpPacket]] = []
    for r in rtp:
        if groups and groups[-1][-1].timestamp == r.timestamp and not groups[-1][-1].marker:
            groups[-1].append(r)
        else:
            groups.append([r])
    assert len(groups) == len(packets)
    for g, p in zip(groups, packets):
        assert [r.marker for r in g] == [False] * (len(g) - 1) + [True]
        assert g[0].timestamp == p.timestamp
        assert b"".join(r.payload for r in g) == p.ps  # forwarded as is, not re-muxed
    demux = PsDemuxer()
    frames = []
    for g in groups:
        frames += demux.feed(b"".join(r.payload for r in g))
        frames += demux.flush()
    assert [f.data for f in frames] == [f.data for p in packets for f in p.frames]
    video = [p for p in packets if p.frames[0].stream == "video"]
    assert [f.keyframe for f in frames if f.stream == "video"] == [p.keyframe for p in video]


async def publish_paced(stream: Stream, packets: list[MediaPacket], delay: float = 0.002) -> None:
    for p in packets:
        stream.publish(p)
        await asyncio.sleep(delay)


async def test_udp_forward() -> None:
    packets = make_packets(start=2**32 - 30 * 3600)  # RTP timestamps wrap midway
    stream = Stream("udp")
    transport, rx, port = await udp_receiver()
    fwd = RtpForwarder(stream, "127.0.0.1", port, ssrc=SSRC)
    try:
        await fwd.start()
        assert fwd.running and stream.consumer_count == 1
        await publish_paced(stream, packets)
        await wait_until(lambda: len(rx.datagrams) >= expected_rtp_count(packets))
        check_rtp(rx.datagrams, packets)
        assert fwd.packets_sent == len(rx.datagrams) and fwd.frames_sent == N_FRAMES
        assert fwd.bytes_sent == sum(map(len, rx.datagrams))
    finally:
        await fwd.stop()
        transport.close()
    assert not fwd.running and stream.consumer_count == 0


async def test_udp_forward_with_audio_and_small_mtu() -> None:
    packets = make_packets(audio="g711a")
    stream = Stream("udp-audio")
    transport, rx, port = await udp_receiver()
    fwd = RtpForwarder(stream, "127.0.0.1", port, ssrc=SSRC, mtu=600)
    try:
        await fwd.start()
        await publish_paced(stream, packets, delay=0.001)
        await wait_until(lambda: len(rx.datagrams) >= expected_rtp_count(packets, 600))
        check_rtp(rx.datagrams, packets, mtu=600)
    finally:
        await fwd.stop()
        transport.close()


async def test_tcp_forward_rfc4571() -> None:
    packets = make_packets(audio="g711a")
    stream = Stream("tcp")
    rx = TcpReceiver()
    port = await rx.start()
    fwd = RtpForwarder(stream, "127.0.0.1", port, transport="tcp", ssrc=SSRC)
    try:
        await fwd.start()
        await wait_until(lambda: rx.connections == 1)
        for p in packets:  # no pacing needed: TCP has flow control
            stream.publish(p)
        total = expected_rtp_count(packets)
        framer = TcpRtpFramer()

        def have_all() -> bool:
            return fwd.packets_sent == total and len(rx.data) == fwd.bytes_sent + 2 * total

        await wait_until(have_all)
        wire = framer.feed(bytes(rx.data))
        assert framer.buffered == 0 and framer.resyncs == 0
        check_rtp(wire, packets)
    finally:
        await fwd.stop()
        await rx.close()
    assert stream.consumer_count == 0


async def test_forward_starts_at_cached_keyframe() -> None:
    packets = make_packets()
    stream = Stream("gop")
    for p in packets[:40]:
        stream.publish(p)
    transport, rx, port = await udp_receiver()
    fwd = RtpForwarder(stream, "127.0.0.1", port, ssrc=SSRC)
    try:
        await fwd.start()
        await publish_paced(stream, packets[40:])
        await wait_until(lambda: len(rx.datagrams) >= expected_rtp_count(packets[25:]))
        check_rtp(rx.datagrams, packets[25:])  # from frame 25's IDR: decodable at once
    finally:
        await fwd.stop()
        transport.close()


async def test_stream_close_and_tcp_peer_close_end_the_forwarder() -> None:
    stream = Stream("closing")
    transport, _, port = await udp_receiver()
    fwd = RtpForwarder(stream, "127.0.0.1", port, ssrc=SSRC)
    await fwd.start()
    stream.close("BYE from the device")
    await asyncio.wait_for(fwd.wait(), 2)
    assert not fwd.running and fwd.error is None
    await fwd.stop()
    transport.close()

    stream = Stream("peer-gone")
    rx = TcpReceiver()
    port = await rx.start()
    fwd = RtpForwarder(stream, "127.0.0.1", port, transport="tcp", ssrc=SSRC)
    await fwd.start()
    await wait_until(lambda: rx.connections == 1)
    await rx.close()  # the upper platform hangs up
    await asyncio.wait_for(fwd.wait(), 5)
    assert fwd.error is not None and stream.consumer_count == 0
    await fwd.stop()


async def test_forwarder_arguments_and_connect_failure() -> None:
    stream = Stream("args")
    with pytest.raises(ValueError):
        RtpForwarder(stream, "127.0.0.1", 9, transport="sctp", ssrc=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RtpForwarder(stream, "127.0.0.1", 9, ssrc=2**32)
    rx = TcpReceiver()
    port = await rx.start()
    await rx.close()  # nothing listens there any more
    fwd = RtpForwarder(stream, "127.0.0.1", port, transport="tcp", ssrc=1)
    with pytest.raises(OSError):
        await fwd.start()
    assert stream.consumer_count == 0
    assert len(encode()) == N_FRAMES

"""RTP/PS forwarding (cascade): UDP, TCP active and passive (RFC 4571, RFC 4145) to local
sockets; the media node's `forward` and `unforward` commands and `forward_ended` event."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time

import pytest

from media.forward import RtpForwarder, UnreachableWatch
from media.hub import Stream
from media.node import MediaNode, NodeError
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


class Ends:
    """An `on_end` callback that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[RtpForwarder, str]] = []

    def __call__(self, fwd: RtpForwarder, reason: str) -> None:
        self.calls.append((fwd, reason))


class TcpClient:
    """The upper platform connecting to a passive forward, collecting what it gets."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.data = bytearray()
        self.task = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, port: int) -> TcpClient:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.writer.get_extra_info("sockname")[:2]
        return host, port

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await self.reader.read(65536):
                self.data += chunk

    async def close(self) -> None:
        self.writer.close()
        await asyncio.gather(self.task, return_exceptions=True)


async def refused_or_closed(port: int) -> bool:
    """A connection to port is refused, or accepted and closed at once without data."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    try:
        return await asyncio.wait_for(reader.read(1), 5) == b""
    except ConnectionError:
        return True
    finally:
        writer.close()


async def test_tcp_passive_forward_sends_to_the_first_connection() -> None:
    packets = make_packets()
    stream = Stream("passive")
    for p in packets[:40]:
        stream.publish(p)
    ends = Ends()
    fwd = RtpForwarder(stream, "192.0.2.1", 9, transport="tcp-passive", ssrc=SSRC,
                       local_addr=("127.0.0.1", 0), on_end=ends)
    client: TcpClient | None = None
    try:
        await fwd.start()
        assert fwd.port > 0 and fwd.running
        assert stream.consumer_count == 0  # subscribed when the peer comes, so it starts at a keyframe
        client = await TcpClient.connect(fwd.port)
        await wait_until(lambda: stream.consumer_count == 1)
        assert fwd.peer == client.address
        assert await refused_or_closed(fwd.port)  # one peer per forward
        for p in packets[40:]:
            stream.publish(p)
        sent = packets[25:]  # from frame 25's IDR, the cached GOP
        total = expected_rtp_count(sent)
        data = client.data
        await wait_until(lambda: fwd.packets_sent == total and len(data) == fwd.bytes_sent + 2 * total)
        framer = TcpRtpFramer()
        wire = framer.feed(bytes(data))
        assert framer.buffered == 0 and framer.resyncs == 0
        check_rtp(wire, sent)
        assert stream.consumer_count == 1
    finally:
        await fwd.stop()
        if client is not None:
            await client.close()
    assert not fwd.running and stream.consumer_count == 0 and ends.calls == []  # stop() is no end
    assert await refused_or_closed(fwd.port)


async def test_tcp_passive_peer_close_and_accept_timeout_call_on_end() -> None:
    stream = Stream("passive-end")
    ends = Ends()
    fwd = RtpForwarder(stream, "127.0.0.1", 9, transport="tcp-passive", ssrc=SSRC,
                       local_addr=("127.0.0.1", 0), on_end=ends)
    await fwd.start()
    client = await TcpClient.connect(fwd.port)
    await wait_until(lambda: stream.consumer_count == 1)
    await client.close()  # the upper platform hangs up
    await asyncio.wait_for(fwd.wait(), 5)
    assert ends.calls == [(fwd, "receiver closed the TCP connection")]
    assert stream.consumer_count == 0 and fwd.error is not None
    await fwd.stop()
    assert len(ends.calls) == 1

    ends = Ends()
    fwd = RtpForwarder(stream, "127.0.0.1", 9, transport="tcp-passive", ssrc=SSRC,
                       local_addr=("127.0.0.1", 0), accept_timeout=0.2, on_end=ends)
    started = time.monotonic()
    await fwd.start()
    await asyncio.wait_for(fwd.wait(), 5)
    assert time.monotonic() - started >= 0.2
    assert isinstance(fwd.error, TimeoutError) and stream.consumer_count == 0
    assert len(ends.calls) == 1 and ends.calls[0][1].startswith(f"no TCP connection to port {fwd.port}")
    assert await refused_or_closed(fwd.port)  # the listening socket is closed with it
    await fwd.stop()
    assert len(ends.calls) == 1


async def test_tcp_passive_port_range() -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    stream = Stream("range")
    fwd = RtpForwarder(stream, "127.0.0.1", 9, transport="tcp-passive", ssrc=SSRC,
                       local_addr=("127.0.0.1", 0), port_range=(port, port))
    with pytest.raises(OSError) as err:
        await fwd.start()
    assert err.value.errno == errno.EADDRINUSE and not fwd.running
    busy.close()
    fwd = RtpForwarder(stream, "127.0.0.1", 9, transport="tcp-passive", ssrc=SSRC,
                       local_addr=("127.0.0.1", 0), port_range=(port, port))
    await fwd.start()
    try:
        assert fwd.port == port
    finally:
        await fwd.stop()
    with pytest.raises(ValueError):
        RtpForwarder(stream, "127.0.0.1", 9, transport="tcp-passive", ssrc=1, port_range=(2000, 1000))


async def test_udp_destination_unreachable_calls_on_end() -> None:
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: every datagram draws an ICMP port unreachable
    packets = make_packets()
    stream = Stream("unreachable")
    ends = Ends()
    fwd = RtpForwarder(stream, "127.0.0.1", port, ssrc=SSRC, unreachable_after=0.5, on_end=ends)
    await fwd.start()
    started = time.monotonic()

    async def publish_forever() -> None:
        while True:
            for p in packets:
                stream.publish(p)
                await asyncio.sleep(0.01)

    publisher = asyncio.create_task(publish_forever())
    try:
        await asyncio.wait_for(fwd.wait(), 5)
    finally:
        publisher.cancel()
    assert time.monotonic() - started >= 0.5
    assert len(ends.calls) == 1 and "unreachable" in ends.calls[0][1]
    assert isinstance(fwd.error, ConnectionRefusedError) and stream.consumer_count == 0
    await fwd.stop()
    assert len(ends.calls) == 1


def test_unreachable_watch_needs_an_unbroken_streak() -> None:
    watch = UnreachableWatch(10.0, quiet=3.0)
    for t in (100.0, 102.5, 105.0, 107.5, 109.9):
        assert not watch.error(t)
    assert watch.error(110.0)  # errors for 10 s, never 3 s apart
    watch = UnreachableWatch(10.0, quiet=3.0)
    for t in (0.0, 2.0, 4.0, 6.0):
        assert not watch.error(t)
    for t in (9.5, 12.0, 14.5, 17.0):  # 3.5 s without an error: packets got through; start again
        assert not watch.error(t)
    assert watch.error(19.5)


async def test_stop_does_not_call_on_end_and_a_stream_close_does() -> None:
    stream = Stream("closing-on-end")
    transport, _, port = await udp_receiver()
    ends = Ends()
    fwd = RtpForwarder(stream, "127.0.0.1", port, ssrc=SSRC, on_end=ends)
    await fwd.start()
    await fwd.stop()
    assert ends.calls == []
    fwd = RtpForwarder(stream, "127.0.0.1", port, ssrc=SSRC, on_end=ends)
    await fwd.start()
    stream.close("BYE from the device")
    await asyncio.wait_for(fwd.wait(), 2)
    assert ends.calls == [(fwd, "stream closed: BYE from the device")] and fwd.error is None
    await fwd.stop()
    transport.close()


def forward_ended(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] == "forward_ended"]


async def test_media_node_forward_unforward_and_forward_ended() -> None:
    events: list[dict] = []
    node = MediaNode("127.0.0.1", on_event=events.append)
    await node.start()
    transport, rx, udp_port = await udp_receiver()
    client: TcpClient | None = None
    try:
        await node.call("open", {"stream": "s", "transport": "udp", "ssrc": 7})
        ns = node.streams["s"]
        to = {"host": "127.0.0.1", "ssrc": SSRC}
        bad = [{"stream": "s", "port": 9, "transport": "sctp", **to},
               {"stream": "s", "transport": "udp", **to},
               {"stream": "s", "port": 9, "host": "", "ssrc": 1},
               {"stream": "s", "port": 9, "host": "127.0.0.1", "ssrc": -1},
               {"stream": "s", "transport": "tcp-passive", "accept_timeout": 0, **to},
               {"stream": "missing", "port": 9, **to}]
        for args in bad:
            with pytest.raises(NodeError) as err:
                await node.call("forward", args)
            assert str(err.value), args
        with pytest.raises(NodeError, match="'forward'"):
            await node.call("unforward", {"stream": "s"})
        assert ns.forwards == {}

        udp = await node.call("forward", {"stream": "s", "port": udp_port, "transport": "udp", **to})
        assert udp == {"forward": "f1", "port": None}
        passive = await node.call("forward", {"stream": "s", "transport": "tcp-passive", **to})
        assert passive["forward"] == "f2" and passive["port"] > 0
        client = await TcpClient.connect(passive["port"])
        await wait_until(lambda: ns.hub.consumer_count == 2)
        listed = (await node.call("streams", {}))["streams"]["s"]["forwards"]
        assert [(f["id"], f["transport"]) for f in listed] == [("f1", "udp"), ("f2", "tcp-passive")]
        assert listed[1]["peer"] == client.address
        packets = make_packets()
        await publish_paced(ns.hub, packets)
        await wait_until(lambda: len(rx.datagrams) >= expected_rtp_count(packets))
        check_rtp(rx.datagrams, packets)

        stopped = await node.call("unforward", {"stream": "s", "forward": "f1"})
        assert stopped == {"stopped": True, "packets_sent": len(rx.datagrams), "frames_sent": N_FRAMES,
                           "bytes_sent": sum(map(len, rx.datagrams))}
        assert await node.call("unforward", {"stream": "s", "forward": "f1"}) == {"stopped": False}
        assert await node.call("unforward", {"stream": "gone", "forward": "f2"}) == {"stopped": False}
        assert list(ns.forwards) == ["f2"]

        await client.close()  # the upper platform hangs up: the node says so and forgets the forward
        await wait_until(lambda: len(forward_ended(events)) == 1)
        assert forward_ended(events) == [{"event": "forward_ended", "stream": "s", "forward": "f2",
                                          "reason": "receiver closed the TCP connection"}]
        assert ns.forwards == {}
        assert await node.call("unforward", {"stream": "s", "forward": "f2"}) == {"stopped": False}

        # Nobody connects to a passive forward: it ends after accept_timeout.
        late = await node.call("forward", {"stream": "s", "transport": "tcp-passive", "accept_timeout": 0.2,
                                           **to})
        assert late["forward"] == "f3"
        await wait_until(lambda: len(forward_ended(events)) == 2)
        assert events[-1]["forward"] == "f3" and "no TCP connection" in events[-1]["reason"]
        assert ns.forwards == {}

        # Forwards stopped with their stream are not reported as ended.
        await node.call("forward", {"stream": "s", "port": udp_port, **to})
        await node.call("forward", {"stream": "s", "transport": "tcp-passive", **to})
        assert list(ns.forwards) == ["f4", "f5"]
        assert await node.call("close", {"stream": "s"}) == {"closed": True}
        await asyncio.sleep(0.05)
        assert len(forward_ended(events)) == 2
        assert ns.forwards == {} and ns.hub.consumer_count == 0
    finally:
        await node.close()
        transport.close()
        if client is not None:
            await client.close()

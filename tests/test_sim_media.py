"""Live video from the simulator (§9.2, Annexes C, F, L): INVITE/200/ACK, PS over RTP by UDP,
TCP passive and TCP active, BYE either way, CANCEL, 486/404/488, vendor quirks, silent and
lossy devices. The platform is ``simulators.probe.Probe`` (a real SipEndpoint); media arrives on
real sockets and goes through the project's own receive path (parse_rtp → RtpReorderer →
FrameAssembler → PsDemuxer) into PyAV's decoder."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import av
import numpy as np
import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st

from gb28181.sdp import parse_sdp
from media.nal import is_keyframe
from media.ps import PsDemuxer
from media.rtp import FrameAssembler, RtpReorderer, parse_rtp
from media.rtp_tcp import TcpRtpFramer
from simulators import fleet as simfleet
from simulators import media as simmedia
from simulators.cli import config_from_args, parser
from simulators.fleet import Fleet, FleetConfig
from simulators.media import SIM_SEI_UUID, alaw_encode, build_sim_sei, parse_sim_sei, tone_frame
from simulators.probe import Probe, start_fleet

IPC = "34020000001320000001"
NVR = "34020000001180000001"
SMALL = dict(video_size="320x240", gop=10, fps=25, bitrate_kbps=500)


# -- receiving ----------------------------------------------------------------------------

@dataclass
class Sink:
    """RTP packets as they arrived: (monotonic time, bytes), their wall-clock arrival in ns, and
    the peer they came from."""

    packets: list[tuple[float, bytes]] = field(default_factory=list)
    arrived_ns: list[int] = field(default_factory=list)
    peer: tuple[str, int] | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    transport: asyncio.BaseTransport | None = None
    server: asyncio.AbstractServer | None = None
    port: int = 0

    def add(self, data: bytes, peer) -> None:
        self.packets.append((time.monotonic(), data))
        self.arrived_ns.append(time.time_ns())
        self.peer = (peer[0], peer[1])

    async def wait(self, count: int, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.packets) < count:
            assert time.monotonic() < deadline, f"only {len(self.packets)} of {count} RTP packets"
            await asyncio.sleep(0.01)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.server is not None:
            self.server.close()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def datagram_received(self, data: bytes, addr) -> None:
        self.sink.add(data, addr)


class _Tcp(asyncio.Protocol):
    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.framer = TcpRtpFramer(strict=True)

    def connection_made(self, transport) -> None:
        self.peer = transport.get_extra_info("peername")
        self.sink.transport = transport
        self.sink.connected.set()

    def data_received(self, data: bytes) -> None:
        for packet in self.framer.feed(data):
            self.sink.add(packet, self.peer)

    def connection_lost(self, exc) -> None:
        self.sink.closed.set()


async def udp_sink() -> Sink:
    sink = Sink()
    loop = asyncio.get_running_loop()
    sink.transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(sink), local_addr=("127.0.0.1", 0))
    sink.port = sink.transport.get_extra_info("sockname")[1]
    return sink


async def tcp_listen_sink() -> Sink:
    sink = Sink()
    sink.server = await asyncio.get_running_loop().create_server(lambda: _Tcp(sink), "127.0.0.1", 0)
    sink.port = sink.server.sockets[0].getsockname()[1]
    return sink


async def tcp_connect_sink(host: str, port: int) -> Sink:
    sink = Sink()
    await asyncio.get_running_loop().create_connection(lambda: _Tcp(sink), host, port)
    return sink


@dataclass
class Analysis:
    frames: int = 0
    decoded: int = 0
    sizes: set = field(default_factory=set)
    counters: list[int] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    first_keyframe: bool = False
    audio: list = field(default_factory=list)
    codecs: dict = field(default_factory=dict)
    lost: int = 0
    reordered: int = 0


def analyse(packets: list[tuple[float, bytes]], *, ssrc: int, codec: str = "h264",
            strict_order: bool = True, lossy: bool = False,
            arrived_ns: list[int] | None = None) -> Analysis:
    """Check every packet (V=2, PT 96, SSRC, ≤ 1400 B, seq +1, one timestamp per frame, marker
    on its last packet), reassemble, demux and decode; returns what came out."""
    out = Analysis()
    reorderer, assembler, demuxer = RtpReorderer(window=64), FrameAssembler(), PsDemuxer()
    decoder = av.CodecContext.create("h264" if codec == "h264" else "hevc", "r")
    prev_seq = None
    ps_frames = []
    arrival: dict[int, int] = {}  # RTP timestamp -> wall-clock arrival of its last packet
    for n, (_, data) in enumerate(packets):
        assert len(data) <= 1400
        pkt = parse_rtp(data)
        assert (pkt.version, pkt.payload_type, pkt.ssrc) == (2, 96, ssrc)
        assert not pkt.csrc and pkt.extension is None and not pkt.padding
        if prev_seq is not None:
            gap = (pkt.sequence - prev_seq - 1) & 0xFFFF
            if gap >= 0x8000:
                out.reordered += 1
                assert not strict_order, f"seq {pkt.sequence} after {prev_seq}"
            elif gap:
                assert lossy or not strict_order, f"seq {pkt.sequence} after {prev_seq}"
        prev_seq = pkt.sequence
        if arrived_ns is not None:
            arrival[pkt.timestamp] = arrived_ns[n]
        for ordered in reorderer.push(pkt):
            for frame in assembler.push(ordered):
                ps_frames.append(frame)
    out.lost = reorderer.lost
    for frame in ps_frames:
        if frame.damaged:
            continue
        assert frame.marker, "a frame must end with the marker bit"
        for f in demuxer.feed(frame.payload) + demuxer.flush():
            if f.stream == "audio":
                out.audio.append(f)
                continue
            assert f.codec == codec and f.pts is not None
            assert f.pts & 0xFFFFFFFF == frame.timestamp  # RTP timestamp = PTS mod 2^32
            if out.frames == 0:
                out.first_keyframe = is_keyframe(f.data, codec)
            out.frames += 1
            sei = parse_sim_sei(f.data, codec)
            assert sei is not None, "every frame carries the simulator SEI"
            out.counters.append(sei[0])
            if arrived_ns is not None:
                out.latencies_ms.append((arrival[frame.timestamp] - sei[1]) / 1e6)
            if not out.lost:
                for picture in decoder.decode(av.Packet(f.data)):
                    out.decoded += 1
                    out.sizes.add((picture.width, picture.height))
    if not out.lost:
        for picture in decoder.decode(None):
            out.decoded += 1
            out.sizes.add((picture.width, picture.height))
    out.codecs = dict(demuxer.codecs)
    return out


def timestamps_step(packets) -> set[int]:
    stamps = sorted({parse_rtp(d).timestamp for _, d in packets})
    return {b - a for a, b in zip(stamps, stamps[1:])}


# -- fixtures -------------------------------------------------------------------------------

@pytest_asyncio.fixture
async def probe():
    p = await Probe().start()
    yield p
    await p.close()


@pytest_asyncio.fixture
async def fleets(probe):
    started: list[Fleet] = []

    async def make(**overrides) -> Fleet:
        cfg = dict(nvr=False, channels=1, first_id=IPC, **SMALL)
        cfg.update(overrides)
        fleet = await start_fleet(probe, **cfg)
        started.append(fleet)
        return fleet

    yield make
    for fleet in started:
        await fleet.stop()


@pytest_asyncio.fixture
async def sinks():
    made: list[Sink] = []

    def keep(sink: Sink) -> Sink:
        made.append(sink)
        return sink

    yield keep
    for sink in made:
        sink.close()


def channel_of(fleet: Fleet, device_id: str = IPC, n: int = 0) -> str:
    return fleet.devices[device_id].channels[n].channel_id


def check_answer(call, *, channel_id: str, proto: str, setup: str | None, y: str) -> None:
    resp = call.response
    assert resp.status == 200 and resp.to_tag
    assert resp.content_type == "application/sdp"
    assert resp.get("contact") == f"<sip:{channel_id}@127.0.0.1:{call.addr[1]}>"
    text = resp.body.decode()
    sd = parse_sdp(resp.body)
    assert (sd.origin_user, sd.origin_addr, sd.session_name, sd.connection_addr) == (
        channel_id, "127.0.0.1", "Play", "127.0.0.1")
    m = sd.video
    assert (m.proto, m.formats, m.rtpmap, m.direction, m.setup) == (
        proto, [96], {96: "PS/90000"}, "sendonly", setup)
    assert m.port > 0
    assert m.connection == ("new" if setup else None)
    assert sd.ssrc == y
    assert sd.format == "v/2/1/25/1/500a///"
    # Annex F order: y= and f= come last.
    assert text.splitlines()[-2:] == [f"y={y}", "f=v/2/1/25/1/500a///"]


# -- the three transports ---------------------------------------------------------------------

async def test_udp_stream_decodes_at_the_frame_rate(probe, fleets, sinks):
    fleet = await fleets()
    ch = channel_of(fleet)
    sink = sinks(await udp_sink())
    call = probe.new_call(IPC, ch, media_port=sink.port)
    await probe.send_invite(call)
    check_answer(call, channel_id=ch, proto="RTP/AVP", setup=None, y=call.ssrc)
    await asyncio.sleep(0.15)
    assert not sink.packets, "no media before the ACK"
    (stream,) = fleet.streams
    assert (stream.channel_id, stream.call_id, stream.transport, stream.ssrc, stream.state) == (
        ch, call.call_id, "udp", int(call.ssrc), "pending")
    probe.ack(call)
    await sink.wait(1)
    first = sink.packets[0][0]
    await asyncio.sleep(1.05)
    window = [p for p in sink.packets if p[0] <= first + 1.0]
    # From a device-side socket: the port of the answer's m= line.
    assert sink.peer == ("127.0.0.1", call.answer.video.port)
    result = analyse(sink.packets, ssrc=int(call.ssrc), arrived_ns=sink.arrived_ns)
    assert result.first_keyframe, "a stream starts at a keyframe"
    assert result.decoded == result.frames >= 20 and result.sizes == {(320, 240)}
    assert all(b == a + 1 for a, b in zip(result.counters, result.counters[1:]))
    assert 0 <= min(result.latencies_ms) and max(result.latencies_ms) < 500  # loopback
    assert timestamps_step(sink.packets) == {3600}  # 90 kHz / 25 fps, one timestamp per frame
    frames_in_1s = len({parse_rtp(d).timestamp for _, d in window})
    assert 18 <= frames_in_1s <= 32
    assert stream.state == "sending" and stream.started_at > 0
    assert stream.frames_sent >= result.frames and stream.packets_sent >= len(sink.packets)
    assert stream.bytes_sent >= sum(len(d) for _, d in sink.packets)


async def test_tcp_passive_offer_device_connects_after_ack(probe, fleets, sinks):
    fleet = await fleets()
    ch = channel_of(fleet)
    sink = sinks(await tcp_listen_sink())
    call = probe.new_call(IPC, ch, transport="tcp-passive", media_port=sink.port)
    await probe.send_invite(call)
    check_answer(call, channel_id=ch, proto="TCP/RTP/AVP", setup="active", y=call.ssrc)
    await asyncio.sleep(0.15)
    assert not sink.connected.is_set(), "the device connects only after the ACK"
    probe.ack(call)
    await asyncio.wait_for(sink.connected.wait(), 2)
    assert sink.transport.get_extra_info("peername")[1] == call.answer.video.port
    await sink.wait(1)
    await asyncio.sleep(0.5)
    result = analyse(sink.packets, ssrc=int(call.ssrc))
    assert result.first_keyframe and result.decoded == result.frames >= 5
    assert result.sizes == {(320, 240)}
    assert all(b == a + 1 for a, b in zip(result.counters, result.counters[1:]))
    assert fleet.streams[0].transport == "tcp" and fleet.streams[0].setup == "active"
    await probe.bye(call)
    await asyncio.wait_for(sink.closed.wait(), 2)  # the device closes its connection


async def test_tcp_active_offer_device_listens(probe, fleets, sinks):
    fleet = await fleets()
    ch = channel_of(fleet)
    call = probe.new_call(IPC, ch, transport="tcp-active", media_port=9)
    await probe.send_invite(call)
    check_answer(call, channel_id=ch, proto="TCP/RTP/AVP", setup="passive", y=call.ssrc)
    answer = call.answer
    # Media starts when the platform connects (the ACK may come later).
    sink = sinks(await tcp_connect_sink(answer.connection_addr, answer.video.port))
    await sink.wait(1)
    probe.ack(call)
    await asyncio.sleep(0.5)
    result = analyse(sink.packets, ssrc=int(call.ssrc))
    assert result.first_keyframe and result.decoded == result.frames >= 5
    assert all(b == a + 1 for a, b in zip(result.counters, result.counters[1:]))
    assert fleet.streams[0].setup == "passive"


# -- ending a call ------------------------------------------------------------------------------

async def test_bye_from_the_platform_stops_the_packets(probe, fleets, sinks):
    fleet = await fleets()
    sink = sinks(await udp_sink())
    call = await probe.play(IPC, channel_of(fleet), media_port=sink.port)
    await sink.wait(3)
    (stream,) = fleet.streams
    resp = await probe.bye(call)
    assert resp.status == 200
    count = len(sink.packets)
    await asyncio.sleep(0.25)
    assert len(sink.packets) == count
    assert fleet.streams == [] and stream.state == "closed"
    stats = fleet.devices[IPC].stats
    assert (stats.invites, stats.invites_accepted, stats.byes_received) == (1, 1, 1)
    assert (await probe.bye(call)).status == 481  # the dialog is gone


async def test_hangup_makes_the_device_send_bye(probe, fleets, sinks):
    fleet = await fleets()
    ch = channel_of(fleet)
    sink = sinks(await udp_sink())
    call = await probe.play(IPC, ch, media_port=sink.port)
    await sink.wait(3)
    task = fleet.hangup(ch)  # the media stops at once; awaiting waits for the BYE's 200
    assert fleet.streams == []
    assert await task == 1
    assert fleet.devices[IPC].stats.byes_sent == 1
    (bye,) = call.byes
    req = bye.request
    assert req.method == "BYE" and req.uri == f"sip:{probe.server_id}@127.0.0.1:{probe.port}"
    assert req.call_id == call.call_id
    assert req.from_tag == call.remote_tag and req.to_tag == call.local_tag
    assert req.cseq[1] == "BYE"
    count = len(sink.packets)
    await asyncio.sleep(0.25)
    assert len(sink.packets) == count and fleet.streams == []
    assert await fleet.hangup(ch) == 0
    with pytest.raises(KeyError):
        await fleet.hangup("34020000001310999999")


async def test_cancel_before_the_answer_gets_487(probe, fleets, sinks):
    fleet = await fleets(answer_delay=0.6)
    sink = sinks(await udp_sink())
    call = probe.new_call(IPC, channel_of(fleet), media_port=sink.port)
    pending = asyncio.create_task(probe.send_invite(call))
    await asyncio.sleep(0.15)
    assert len(fleet.calls) == 1 and fleet.calls[0].state == "early"
    assert (await probe.cancel(call)).status == 200
    resp = await pending
    assert resp.status == 487
    assert fleet.calls == [] and fleet.streams == []
    await asyncio.sleep(0.6)  # past the answer delay: no late 200, no media
    assert call.response.status == 487 and not sink.packets


async def test_lost_tcp_connection_makes_the_device_hang_up(probe, fleets, sinks, monkeypatch):
    monkeypatch.setattr(simfleet, "MEDIA_LOST_GRACE", 0.05)
    fleet = await fleets()
    sink = sinks(await tcp_listen_sink())
    call = await probe.play(IPC, channel_of(fleet), transport="tcp-passive", media_port=sink.port)
    await sink.wait(1)
    sink.transport.close()  # the platform drops the media connection without a BYE
    await probe.wait_for(lambda: call.byes, 3, "the device's BYE")
    assert fleet.streams == []


async def test_unacknowledged_200_is_given_up_with_bye(probe, fleets, sinks):
    fleet = await fleets(t1=0.02)  # Timer L = 64 T1 = 1.28 s
    sink = sinks(await udp_sink())
    call = probe.new_call(IPC, channel_of(fleet), media_port=sink.port)
    assert (await probe.send_invite(call)).status == 200
    await probe.wait_for(lambda: call.byes, 4, "BYE after the missing ACK")
    assert fleet.streams == [] and not sink.packets


async def test_same_subject_replaces_the_stream(probe, fleets, sinks):
    fleet = await fleets()
    ch = channel_of(fleet)
    subject = f"{ch}:0200000042,{probe.server_id}:0"
    first = await probe.play(IPC, ch, media_port=(sinks(await udp_sink())).port, subject=subject)
    second = await probe.play(IPC, ch, media_port=(sinks(await udp_sink())).port, subject=subject)
    assert [s.call_id for s in fleet.streams] == [second.call_id]  # Annex M
    assert not first.byes


async def test_sip_over_tcp(sinks):
    probe = await Probe(transport="tcp").start()
    fleet = await start_fleet(probe, nvr=False, channels=1, first_id=IPC, **SMALL)
    try:
        sink = sinks(await udp_sink())
        ch = channel_of(fleet)
        call = await probe.play(IPC, ch, media_port=sink.port)
        await sink.wait(1)
        assert await fleet.hangup(ch) == 1
        assert [b.request.method for b in call.byes] == ["BYE"]
    finally:
        await fleet.stop()
        await probe.close()


# -- refusals ----------------------------------------------------------------------------------

async def test_more_streams_than_max_streams_get_486(probe, fleets, sinks):
    fleet = await fleets(max_streams=2)
    ch = channel_of(fleet)
    first = await probe.play(IPC, ch, media_port=(sinks(await udp_sink())).port)
    await probe.play(IPC, ch, media_port=(sinks(await udp_sink())).port)
    third = probe.new_call(IPC, ch, media_port=(sinks(await udp_sink())).port)
    assert (await probe.send_invite(third)).status == 486
    await probe.bye(first)
    again = probe.new_call(IPC, ch, media_port=(sinks(await udp_sink())).port)
    assert (await probe.send_invite(again)).status == 200
    assert len(fleet.streams) == 2


async def test_unknown_channel_and_unusable_offers(probe, fleets, sinks):
    fleet = await fleets()
    ch = channel_of(fleet)
    port = (sinks(await udp_sink())).port
    unknown = probe.new_call(IPC, "34020000001310999999", media_port=port)
    assert (await probe.send_invite(unknown)).status == 404
    offer = probe.offer("udp", "127.0.0.1", port, "0200000077").decode()
    bad = {
        "garbage": b"this is not SDP",
        "playback": offer.replace("s=Play", "s=Playback").encode(),
        "no PS": offer.replace(f"m=video {port} RTP/AVP 96 97 98", f"m=video {port} RTP/AVP 98").encode(),
        "no port": offer.replace(f"m=video {port} ", "m=video 0 ").encode(),
        "no video": offer.replace("m=video", "m=audio").encode(),
    }
    for name, body in bad.items():
        call = probe.new_call(IPC, ch, body=body)
        resp = await probe.send_invite(call)
        assert resp.status == 488, name
    assert fleet.streams == []
    # The IPC's own ID stands for its only camera.
    call = await probe.play(IPC, IPC, media_port=port)
    assert fleet.streams[0].channel_id == ch and call.answer.origin_user == ch


async def test_media_mode_refuse_and_silent(probe, fleets, sinks):
    refusing = await fleets(media_mode="refuse")
    call = probe.new_call(IPC, channel_of(refusing), media_port=(sinks(await udp_sink())).port)
    assert (await probe.send_invite(call)).status == 488
    await refusing.stop()
    probe.devices.clear()
    silent = await fleets(media_mode="silent", first_id="34020000001320000002")
    sink = sinks(await udp_sink())
    device = "34020000001320000002"
    call = await probe.play(device, channel_of(silent, device), media_port=sink.port)
    assert call.answer.ssrc == call.ssrc
    await asyncio.sleep(0.5)
    assert not sink.packets
    (stream,) = silent.streams
    assert stream.frames_sent == stream.packets_sent == 0 and stream.started_at > 0


# -- vendors -------------------------------------------------------------------------------

async def test_dahua_sends_101_with_the_dialog_tag(probe, fleets, sinks):
    fleet = await fleets(vendor="dahua")
    sink = sinks(await udp_sink())
    call = await probe.play(IPC, channel_of(fleet), media_port=sink.port)
    (prov,) = call.provisional
    assert (prov.status, prov.reason) == (101, "Dialog Establishement")
    assert prov.to_tag and prov.to_tag == call.response.to_tag
    await sink.wait(1)


async def test_hikvision_zero_pads_y(probe, fleets, sinks):
    fleet = await fleets(vendor="hikvision")
    sink = sinks(await udp_sink())
    call = await probe.play(IPC, channel_of(fleet), media_port=sink.port, ssrc="630886")
    assert call.answer.ssrc == "0000630886"
    await sink.wait(1)
    assert parse_rtp(sink.packets[0][1]).ssrc == 630886


# -- impairments, audio, H.265, sharing ------------------------------------------------------------

async def impaired_stream(probe, fleets, sinks, seconds: float, **impairment):
    """Play one 4 Mbit/s stream for ``seconds``, then BYE; returns (stream, call, sink)."""
    fleet = await fleets(bitrate_kbps=4000, **impairment)
    sink = sinks(await udp_sink())
    call = await probe.play(IPC, channel_of(fleet), media_port=sink.port)
    await sink.wait(1)
    await asyncio.sleep(seconds)
    (stream,) = fleet.streams
    await probe.bye(call)
    return stream, call, sink


async def test_loss_drops_about_the_configured_share(probe, fleets, sinks):
    stream, call, sink = await impaired_stream(probe, fleets, sinks, 0.8, loss=0.05)
    total = stream.packets_sent + stream.packets_lost
    assert total > 150
    assert 0.02 <= stream.packets_lost / total <= 0.09
    result = analyse(sink.packets, ssrc=int(call.ssrc), lossy=True)
    # The receiver sees the gaps between its first and last packet: all but a stray few.
    assert 0 <= stream.packets_lost - result.lost <= 3 and result.lost > 0


async def test_reorder_swaps_packets_but_loses_none(probe, fleets, sinks):
    stream, call, sink = await impaired_stream(probe, fleets, sinks, 0.5, reorder=0.05)
    assert stream.packets_reordered > 0 and stream.packets_lost == 0
    result = analyse(sink.packets, ssrc=int(call.ssrc), strict_order=False)
    assert result.reordered > 0 and result.lost == 0
    assert result.decoded == result.frames > 0


async def test_audio_is_a_law_tone_in_its_own_ps_packets(probe, fleets, sinks):
    fleet = await fleets(audio=True)
    sink = sinks(await udp_sink())
    call = await probe.play(IPC, channel_of(fleet), media_port=sink.port)
    assert call.answer.format == "v/2/1/25/1/500a/1/8/1"
    await sink.wait(1)
    await asyncio.sleep(0.5)
    result = analyse(sink.packets, ssrc=int(call.ssrc))
    assert result.codecs == {0xE0: "h264", 0xC0: "g711a"}  # the PSM lists both
    assert result.decoded == result.frames > 0
    assert len(result.audio) >= 2 * result.frames - 2  # 20 ms audio vs 40 ms video
    assert {f.codec for f in result.audio} == {"g711a"}
    assert {len(f.data) for f in result.audio} == {160}
    pts = [f.pts for f in result.audio]
    assert {b - a for a, b in zip(pts, pts[1:])} == {1800}
    samples = _alaw_decode(result.audio[0].data)
    crossings = np.count_nonzero(np.diff(np.signbit(samples)))
    assert crossings in (39, 40, 41)  # 1 kHz for 20 ms: 20 periods
    assert 0.2 * 32767 < np.abs(samples).max() < 0.35 * 32767


def _alaw_decode(data: bytes) -> np.ndarray:
    dec = av.CodecContext.create("pcm_alaw", "r")
    dec.sample_rate, dec.layout = 8000, "mono"
    frames = dec.decode(av.Packet(data))
    return np.concatenate([f.to_ndarray().ravel() for f in frames]).astype(np.int32)


def test_alaw_encoder_round_trips_through_ffmpeg():
    pcm = np.linspace(-32768, 32767, 4000).astype(np.int16)
    decoded = _alaw_decode(alaw_encode(pcm))
    err = np.abs(decoded - pcm.astype(np.int32))
    # A-law quantisation: the step grows with the magnitude, at most 1/32 of it plus a bit.
    assert np.all(err <= np.abs(pcm.astype(np.int32)) / 30 + 16)
    assert len(tone_frame()) == 160


async def test_h265_stream_decodes(probe, fleets, sinks):
    fleet = await fleets(video_codec="h265")
    sink = sinks(await udp_sink())
    call = await probe.play(IPC, channel_of(fleet), media_port=sink.port)
    assert call.answer.format == "v//1/25/1/500a///"
    await sink.wait(1, timeout=5)
    await asyncio.sleep(0.4)
    result = analyse(sink.packets, ssrc=int(call.ssrc), codec="h265")
    assert result.first_keyframe and result.decoded == result.frames > 0
    assert result.sizes == {(320, 240)}


async def test_streams_share_one_frame_per_tick(probe, fleets, sinks):
    # One copy of the clip: every stream gets the very same PS bytes each tick. (With several
    # copies, streams share per copy; see test_new_streams_start_within_a_fraction_of_the_gop.)
    fleet = await fleets(nvr=True, channels=4, first_id=NVR, start_variants=1)
    calls, made = [], []
    for n in range(4):
        sink = sinks(await udp_sink())
        made.append(sink)
        calls.append(await probe.play(NVR, channel_of(fleet, NVR, n), media_port=sink.port))
    for sink in made:
        await sink.wait(5)
    await asyncio.sleep(0.3)
    for sink in made:  # stop the flow, then compare what arrived
        sink.close()
    per_stream = []
    for _call, sink in zip(calls, made):
        by_ts: dict[int, list[bytes]] = {}
        for _, d in sink.packets:
            p = parse_rtp(d)
            by_ts.setdefault(p.timestamp, []).append(bytes(p.payload))
        per_stream.append(by_ts)
    common = set.intersection(*(set(s) for s in per_stream))
    assert len(common) >= 3
    ts = sorted(common)[1]
    assert all(s[ts] == per_stream[0][ts] for s in per_stream)  # the same PS bytes for all
    assert len({s.ssrc for s in fleet.streams}) == 4 and len(fleet.streams) == 4
    assert fleet.media.ticks >= max(s.frames_sent for s in fleet.streams)


async def test_new_streams_start_within_a_fraction_of_the_gop(probe, fleets, sinks):
    """Five clip copies with shifted keyframes: at any tick some copy has a keyframe at most
    GOP/5 - 1 ticks ahead, a new stream takes that copy, and every stream starts on a keyframe."""
    fleet = await fleets(nvr=True, channels=4, first_id=NVR, gop=25, start_variants=5)
    sender = fleet.media
    await sender.prepare()
    assert len(sender.clips) == 5
    count = len(sender.clips[0])
    for n in range(count):
        clip = sender.clips[sender._variant_for(n)]
        ahead = next(a for a in range(count) if clip.keyframes[(n + a) % count])
        assert ahead <= 25 // 5 - 1, (n, ahead)
    for n in range(4):
        sink = sinks(await udp_sink())
        await probe.play(NVR, channel_of(fleet, NVR, n), media_port=sink.port)
        await sink.wait(5)
        await asyncio.sleep(0.1 * (n + 1))  # the next one joins elsewhere in the GOP
        frames = PsDemuxer().feed(b"".join(bytes(parse_rtp(d).payload) for _, d in sink.packets[:40]))
        assert frames and frames[0].keyframe, "every stream starts with a keyframe"


# -- pieces --------------------------------------------------------------------------------

@pytest.mark.parametrize("codec", ["h264", "h265"])
@pytest.mark.parametrize("counter,stamp", [(0, 0), (1, 2**40), (2**64 - 1, 1_700_000_000_000_000_000),
                                           (0x0000000100000003, 3)])
def test_sim_sei_round_trip(codec, counter, stamp):
    sei = build_sim_sei(counter, stamp, codec)
    assert sei.startswith(b"\x00\x00\x00\x01") and SIM_SEI_UUID in sei
    assert b"\x00\x00\x00" not in sei[4:] and b"\x00\x00\x01" not in sei[4:]  # escaped
    au = b"\x00\x00\x00\x01\x09\xf0" + sei + b"\x00\x00\x01\x65\x88\x84\x00\x10"
    assert parse_sim_sei(au) == (counter, stamp)
    assert parse_sim_sei(au, codec) == (counter, stamp)
    assert parse_sim_sei(au[:len(au) - len(sei) - 8] + au[-8:]) is None


@given(counter=st.integers(0, 2**64 - 1), stamp=st.integers(0, 2**64 - 1),
       codec=st.sampled_from(["h264", "h265"]), junk=st.binary(max_size=64))
def test_sim_sei_round_trips_any_values(counter, stamp, codec, junk):
    au = b"\x00\x00\x00\x01\x09\xf0" + build_sim_sei(counter, stamp, codec) + b"\x00\x00\x01" + junk
    assert parse_sim_sei(au) == (counter, stamp)


@given(st.binary(max_size=200), st.sampled_from([None, "h264", "h265"]))
def test_parse_sim_sei_never_raises_on_garbage(data, codec):
    # With the UUID planted, so the parser gets past its quick rejection.
    for au in (data, b"\x00\x00\x01\x06\x05\x20" + SIM_SEI_UUID + data,
               b"\x00\x00\x01\x4e\x01\xff\xff" + SIM_SEI_UUID + data[:3]):
        result = parse_sim_sei(au, codec)
        assert result is None or isinstance(result, tuple)


def test_clip_is_cached_and_keyframes_follow_the_gop():
    clip = simmedia.get_clip("h264", "320x240", 25, 10, 500)
    assert simmedia.get_clip("h264", (320, 240), 25, 10, 500) is clip
    assert len(clip) % 10 == 0
    assert [i for i, k in enumerate(clip.keyframes) if k] == list(range(0, len(clip), 10))
    au = clip.access_unit(0, 42, 7)
    assert parse_sim_sei(au) == (42, 7) and is_keyframe(au, "h264")
    assert au.index(SIM_SEI_UUID) < au.index(b"\x00\x00\x01\x65")  # SEI before the IDR slice


@pytest.mark.parametrize("field_,value", [
    ("media_mode", "loud"), ("loss", 1.5), ("reorder", -0.1), ("video_size", "big"),
    ("video_size", "321x240"), ("fps", 0), ("gop", 0), ("video_codec", "vp8"), ("max_streams", -1)])
def test_bad_media_config_is_refused(field_, value):
    with pytest.raises(ValueError):
        Fleet(FleetConfig(**{field_: value}))


def test_cli_maps_the_media_flags():
    args = parser().parse_args([
        "--video-size", "1280x720", "--fps", "30", "--gop", "60", "--bitrate", "2048",
        "--video-codec", "h265", "--audio", "--max-streams", "3", "--media-mode", "silent",
        "--loss", "0.1", "--reorder", "0.02", "--answer-delay", "0.5"])
    cfg = config_from_args(args)
    assert (cfg.video_size, cfg.fps, cfg.gop, cfg.bitrate_kbps, cfg.video_codec, cfg.audio,
            cfg.max_streams, cfg.media_mode, cfg.loss, cfg.reorder, cfg.answer_delay) == (
        "1280x720", 30, 60, 2048, "h265", True, 3, "silent", 0.1, 0.02, 0.5)
    defaults = config_from_args(parser().parse_args([]))
    assert (defaults.video_codec, defaults.video_size, defaults.fps, defaults.gop,
            defaults.bitrate_kbps, defaults.audio, defaults.media_mode, defaults.loss,
            defaults.reorder, defaults.max_streams) == (
        "h264", "640x360", 25, 50, 1000, False, "normal", 0.0, 0.0, 8)

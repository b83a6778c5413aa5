"""FLV muxer (H.264, enhanced-FLV H.265, G.711) and the HTTP-FLV / WS-FLV handlers.

Interop: PyAV (FFmpeg 8) demuxes and decodes what FlvMuxer writes; ffprobe/ffmpeg
(Debian's) read a captured HTTP-FLV stream without a single error line.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import random
import shutil
import struct
import subprocess
import time

import pytest
from aiohttp import ClientSession, WSMsgType, web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from media import nal
from media.flv import FlvMuxer, avc_decoder_config, hevc_decoder_config
from media.http_flv import serve_http_flv, serve_ws_flv
from media.hub import Stream
from media.packet import MediaPacket
from media.ps import PsFrame

from .test_hub import HEIGHT, N_FRAMES, TICKS, WIDTH, encode, looped_packets, make_packets

av = pytest.importorskip("av", exc_type=ImportError)
import av.logging  # noqa: E402, F811  (after the skip; rebinds av to the same module, adds .logging)

# -- helpers ---------------------------------------------------------------------------------


def mux_all(packets: list[MediaPacket], **kw) -> bytes:
    m = FlvMuxer(**kw)
    return m.header() + b"".join(m.mux(p) for p in packets)


def parse_tags(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, timestamp ms, body) per tag; checks the header and every PreviousTagSize."""
    assert data[:3] == b"FLV" and data[3] == 1
    off = struct.unpack(">I", data[5:9])[0]
    assert struct.unpack(">I", data[off:off + 4])[0] == 0
    off += 4
    tags = []
    while off < len(data):
        t = data[off]
        size = int.from_bytes(data[off + 1:off + 4], "big")
        ts = int.from_bytes(data[off + 4:off + 7], "big") | data[off + 7] << 24
        assert data[off + 8:off + 11] == b"\x00\x00\x00"
        body = data[off + 11:off + 11 + size]
        assert len(body) == size
        prev = struct.unpack(">I", data[off + 11 + size:off + 15 + size])[0]
        assert prev == size + 11
        tags.append((t, ts, body))
        off += 15 + size
    return tags


def nalus(body: bytes) -> list[bytes]:
    """NAL units of a length-prefixed payload."""
    out, off = [], 0
    while off < len(body):
        n = struct.unpack(">I", body[off:off + 4])[0]
        assert n > 0 and off + 4 + n <= len(body)
        out.append(body[off + 4:off + 4 + n])
        off += 4 + n
    return out


def decode_flv(data: bytes) -> tuple[list, dict, list[str]]:
    """Decoded video frames, {stream kind: [packet dts]} and FFmpeg's warning/error lines."""
    frames: list = []
    dts: dict[str, list[int]] = {}
    av.logging.set_level(av.logging.WARNING)
    try:
        with av.logging.Capture() as logs:
            with av.open(io.BytesIO(data), format="flv") as c:
                for pkt in c.demux():
                    if pkt.size:
                        dts.setdefault(pkt.stream.type, []).append(pkt.dts)
                    if pkt.stream.type == "video":
                        frames += pkt.decode()  # the empty packet at the end flushes
    finally:
        av.logging.set_level(None)
    return frames, dts, [f"{name}: {msg.strip()}" for level, name, msg in logs if level <= av.logging.WARNING]


def flv_streams(data: bytes) -> dict[str, tuple]:
    with av.open(io.BytesIO(data), format="flv") as c:
        return {s.type: (s.codec_context.name, getattr(s.codec_context, "sample_rate", None)
                         if s.type == "audio" else (s.codec_context.width, s.codec_context.height))
                for s in c.streams}


def decode_annexb(aus: list[bytes], codec: str = "h264") -> list:
    cc = av.CodecContext.create(codec, "r")
    frames = []
    for au in aus:
        frames += cc.decode(av.Packet(au))
    frames += cc.decode(None)
    return frames


def same_pictures(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        (x.to_ndarray() == y.to_ndarray()).all() for x, y in zip(a, b))


# -- H.264 --------------------------------------------------------------------------------


def test_h264_decodes_every_frame_identically() -> None:
    packets = make_packets(start=12345)
    data = mux_all(packets)
    frames, dts, errors = decode_flv(data)
    assert errors == []
    assert len(frames) == N_FRAMES
    assert {(f.width, f.height) for f in frames} == {(WIDTH, HEIGHT)}
    assert same_pictures(frames, decode_annexb([a for a, *_ in encode()]))
    assert dts["video"] == [i * 40 for i in range(N_FRAMES)]  # from 0, 40 ms per frame
    assert flv_streams(data) == {"video": ("h264", (WIDTH, HEIGHT))}


def test_h264_tag_structure() -> None:
    aus = [a for a, *_ in encode()]
    tags = parse_tags(mux_all(make_packets()))
    video = [(ts, b) for t, ts, b in tags if t == 9]
    assert len(video) == 1 + N_FRAMES
    seq_ts, seq = video[0]
    assert seq[:5] == b"\x17\x00\x00\x00\x00" and seq_ts == 0
    sps = nal.find_nal(aus[0], "h264", nal.H264_NAL_SPS)
    pps = nal.find_nal(aus[0], "h264", nal.H264_NAL_PPS)
    assert seq[5:] == avc_decoder_config([sps], [pps])
    assert seq[5] == 1 and seq[6:9] == sps[1:4] and seq[9] == 0xFF and seq[10] == 0xE1
    for i, (_ts, body) in enumerate(video[1:]):
        key = i % 25 == 0
        assert body[0] == (0x17 if key else 0x27) and body[1] == 1
        assert body[2:5] == b"\x00\x00\x00"  # no B-frames: composition time 0
        units = nalus(body[5:])
        types = [u[0] & 0x1F for u in units]
        assert not {7, 8, 9} & set(types)
        expected = [u for u in nal.iter_nal_units(aus[i]) if u[0] & 0x1F not in (7, 8, 9)]
        assert units == expected
    # x264 puts its version SEI in the first access unit: it is kept.
    assert 6 in [u[0] & 0x1F for u in nalus(video[1][1][5:])]


def test_h264_with_g711a_audio() -> None:
    data = mux_all(make_packets(audio="g711a"), audio=True)
    assert data[4] == 0x05
    frames, dts, errors = decode_flv(data)
    assert errors == [] and len(frames) == N_FRAMES
    assert flv_streams(data)["audio"] == ("pcm_alaw", 8000)
    assert len(dts["audio"]) == N_FRAMES
    for kind in ("audio", "video"):
        assert dts[kind] == sorted(dts[kind]) and dts[kind][0] == 0
    tags = parse_tags(data)
    audio = [b for t, _, b in tags if t == 8]
    assert {b[0] for b in audio} == {0x72} and all(b[1:] == b"\xd5" * 320 for b in audio)
    with av.open(io.BytesIO(data), format="flv") as c:
        a = c.streams.audio[0].codec_context
        assert a.channels == 1 if hasattr(a, "channels") else a.layout.nb_channels == 1


def test_g711u_audio_track() -> None:
    data = mux_all(make_packets(audio="g711u"), audio=True)
    assert flv_streams(data)["audio"] == ("pcm_mulaw", 8000)
    assert {b[0] for t, _, b in parse_tags(data) if t == 8} == {0x82}


def test_audio_only_muxer_and_audio_before_video() -> None:
    """Audio tags come first while the video codec is still unknown; the file stays valid."""
    pk = make_packets(audio="g711a")
    audio = [p for p in pk if p.frames[0].stream == "audio"]
    m = FlvMuxer(audio=True)
    data = m.header() + b"".join(m.mux(p) for p in audio[:5]) + b"".join(m.mux(p) for p in pk[10:])
    tags = parse_tags(data)
    assert [t for t, _, _ in tags[:5]] == [8] * 5 and tags[0][1] == 0
    frames, dts, errors = decode_flv(data)
    assert errors == [] and len(frames) == N_FRAMES - 25  # video starts at frame 25's IDR
    assert m.skipped == 20  # frames 5..24 (the ones after pk[10]) waited for the keyframe
    only_audio = FlvMuxer(video=False, audio=True)
    data = only_audio.header() + b"".join(only_audio.mux(p) for p in pk)
    assert data[4] == 0x04 and flv_streams(data) == {"audio": ("pcm_alaw", 8000)}


def test_video_starts_at_keyframe() -> None:
    pk = make_packets()
    m = FlvMuxer()
    assert m.mux(pk[3]) == b"" and m.mux(pk[24]) == b""
    data = m.header() + b"".join(m.mux(p) for p in pk[25:])
    tags = parse_tags(data)
    assert tags[0][2][:2] == b"\x17\x00" and tags[1][2][:2] == b"\x17\x01"
    assert tags[0][1] == tags[1][1] == 0
    frames, _, errors = decode_flv(data)
    assert errors == [] and len(frames) == 50


@pytest.mark.parametrize("start", [2**33 - 20 * TICKS, 2**32 - 20 * TICKS], ids=["pts-33bit", "rtp-32bit"])
def test_timestamps_across_clock_wrap(start: int) -> None:
    pk = make_packets(audio="g711a", start=start)
    tags = parse_tags(mux_all(pk, audio=True))
    for kind in (8, 9):
        ts = [t for typ, t, b in tags if typ == kind and not (kind == 9 and b[1] == 0)]
        assert ts == [i * 40 for i in range(N_FRAMES)], ts[15:25]


def test_timestamps_fall_back_to_rtp_and_survive_jumps() -> None:
    pk = make_packets()
    m = FlvMuxer()
    out = []
    for i, p in enumerate(pk):
        f = p.frames[0]
        if i < 30:  # a PTS-less stream: the RTP timestamp is used
            f = PsFrame("video", "h264", f.data, None, None, f.keyframe)
        elif i >= 50:  # the device restarted its clock
            f = PsFrame("video", "h264", f.data, f.pts + 10**9, f.dts + 10**9, f.keyframe)
        out.append(m.mux(MediaPacket(p.ps, p.timestamp, [f], p.keyframe)))
    ts = [t for typ, t, b in parse_tags(m.header() + b"".join(out)) if b[1] == 1]
    assert ts == sorted(ts) and ts[0] == 0 and ts[49] == 49 * 40
    assert ts[50] - ts[49] <= 40 and ts[-1] - ts[50] == 24 * 40


def test_sequence_header_resent_when_sps_changes() -> None:
    small = encode(width=160, height=128, n=50)
    pk = make_packets() + make_packets(small, first_index=N_FRAMES)
    data = mux_all(pk)
    seq_headers = [b for t, _, b in parse_tags(data) if t == 9 and b[:2] == b"\x17\x00"]
    assert len(seq_headers) == 2
    frames, _, errors = decode_flv(data)
    assert [(f.width, f.height) for f in frames] == [(WIDTH, HEIGHT)] * N_FRAMES + [(160, 128)] * 50
    assert errors == []


def test_h264_high_profile_record_has_chroma_fields() -> None:
    au = encode()[0][0]
    sps = nal.find_nal(au, "h264", nal.H264_NAL_SPS)
    pps = nal.find_nal(au, "h264", nal.H264_NAL_PPS)
    rec = avc_decoder_config([sps], [pps])
    if sps[1] in (100, 110, 122, 144):
        assert rec[-4:] == bytes((0xFD, 0xF8, 0xF8, 0))
    else:
        assert rec.endswith(pps)


# -- H.265 (enhanced FLV) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def hevc_frames():
    if "libx265" not in av.codecs_available:
        pytest.skip("PyAV has no libx265 encoder")
    return encode("libx265")


def test_h265_enhanced_flv_decodes(hevc_frames) -> None:
    pk = make_packets(hevc_frames, codec="h265", start=2**32 - 7 * TICKS, audio="g711a")
    data = mux_all(pk, audio=True)
    tags = parse_tags(data)
    video = [b for t, _, b in tags if t == 9]
    assert video[0][:5] == b"\x90hvc1"  # IsExHeader | keyframe | SequenceStart
    vps, sps, pps = (nal.find_nal(hevc_frames[0][0], "h265", t) for t in (32, 33, 34))
    assert video[0][5:] == hevc_decoder_config([vps], [sps], [pps])
    info = nal.parse_h265_sps(sps)
    rec = video[0][5:]
    assert rec[0] == 1 and rec[1] & 0x1F == info.profile_idc and rec[12] == info.level_idc
    assert rec[16] == 0xFC | info.chroma_format_idc and rec[21] & 3 == 3  # 4-byte NALU lengths
    kinds = {b[0] & 0x8F for b in video[1:]}
    assert kinds <= {0x81, 0x83} and all(b[1:5] == b"hvc1" for b in video)
    assert video[1][0] & 0x70 == 0x10  # the first frame is a keyframe
    frames, dts, errors = decode_flv(data)
    assert errors == []
    assert len(frames) == N_FRAMES and {(f.width, f.height) for f in frames} == {(WIDTH, HEIGHT)}
    assert same_pictures(frames, decode_annexb([a for a, *_ in hevc_frames], "hevc"))
    assert dts["video"] == sorted(dts["video"]) and dts["audio"] == sorted(dts["audio"])
    assert flv_streams(data)["video"] == ("hevc", (WIDTH, HEIGHT))


# -- fuzz ---------------------------------------------------------------------------------

_NAL_HEADS = [bytes((b,)) for b in (0x09, 0x67, 0x68, 0x06, 0x65, 0x41, 0x01)] + [
    bytes((t << 1, 1)) for t in (32, 33, 34, 35, 39, 19, 1)]

_PLAUSIBLE_H264 = [b"\x09", b"\x67\x64\x00\x1f", b"\x68", b"\x06", b"\x65"]
_PLAUSIBLE_H265 = [b"\x40\x01", b"\x42\x01\x01\x01", b"\x44\x01", b"\x26\x01"]


@st.composite
def random_frames(draw) -> list[PsFrame]:
    frames = []
    for _ in range(draw(st.integers(1, 4))):
        stream = draw(st.sampled_from(["video", "video", "audio"]))
        codec = draw(st.sampled_from(["h264", "h265", "unknown"] if stream == "video"
                                     else ["g711a", "g711u", "unknown"]))
        parts = draw(st.lists(st.tuples(
            st.sampled_from([b"", b"\x00\x00\x01", b"\x00\x00\x00\x01"]),
            st.sampled_from(_NAL_HEADS + [b""]),
            st.binary(max_size=40)), max_size=6))
        data = b"".join(a + b + c for a, b, c in parts)
        if stream == "video" and draw(st.booleans()):
            # A plausible keyframe AU (parameter sets + IRAP slice) with random contents.
            heads = _PLAUSIBLE_H265 if codec == "h265" else _PLAUSIBLE_H264
            data = b"".join(b"\x00\x00\x00\x01" + h + draw(st.binary(min_size=2, max_size=20))
                            for h in heads) + data
        ts = st.one_of(st.none(), st.integers(0, 2**33 - 1))
        frames.append(PsFrame(stream, codec, data, draw(ts), draw(ts), draw(st.booleans())))
    return frames


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(random_frames(), st.integers(0, 2**32 - 1), st.booleans()), max_size=12),
       st.booleans())
def test_fuzz_muxer_never_raises(packets, audio: bool) -> None:
    m = FlvMuxer(audio=audio)
    by_parts = FlvMuxer(audio=audio)
    out = [m.header()]
    for frames, ts, key in packets:
        out.append(m.mux(MediaPacket(b"", ts, frames, key)))
        parts: list = []
        size = by_parts.mux_parts(MediaPacket(b"", ts, frames, key), parts)
        assert b"".join(parts) == out[-1] and size == len(out[-1])  # the same tags, unjoined
    tags = parse_tags(b"".join(out))
    for kind in (8, 9):
        ts = [t for typ, t, _ in tags if typ == kind]
        assert ts == sorted(ts)
    for typ, _, body in tags:
        if typ == 9 and body[0] & 0x80:  # enhanced: CodedFrames has a composition time
            assert body[1:5] == b"hvc1"
            if body[0] & 0x0F in (1, 3):
                nalus(body[8:] if body[0] & 0x0F == 1 else body[5:])
        elif typ == 9:
            assert body[0] & 0x0F == 7
            if body[1] == 1:
                assert nalus(body[5:])


def test_fuzz_real_stream_with_damage() -> None:
    """Corrupted real AUs: the muxer never raises and keeps its output well-formed."""
    rng = random.Random(7)
    pk = make_packets(audio="g711a")
    m = FlvMuxer(audio=True)
    out = [m.header()]
    for p in pk:
        f = p.frames[0]
        data = bytearray(f.data)
        for _ in range(rng.randrange(4)):
            if data:
                data[rng.randrange(len(data))] = rng.choice((0, 1, 0x67, 0x68, 0x09, rng.randrange(256)))
        out.append(m.mux(MediaPacket(p.ps, p.timestamp, [PsFrame(f.stream, f.codec, bytes(data), f.pts, f.dts,
                                                                   f.keyframe, f.stream_id)], p.keyframe)))
    parse_tags(b"".join(out))


# -- HTTP-FLV / WS-FLV ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def flv_server(stream: Stream, **kw):
    app = web.Application()

    async def http(request: web.Request) -> web.StreamResponse:
        return await serve_http_flv(request, stream, **kw)

    async def ws(request: web.Request) -> web.StreamResponse:
        return await serve_ws_flv(request, stream, **kw)

    app.router.add_get("/live.flv", http)
    app.router.add_get("/ws.flv", ws)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def publish_live(stream: Stream, packets: list[MediaPacket], fps: float = 25, close: bool = False) -> None:
    """Publish in real time: each video packet (and the audio after it) every 1/fps s."""
    t0 = time.monotonic()
    n = 0
    for p in packets:
        if p.frames and p.frames[0].stream == "video":
            n += 1
            delay = t0 + n / fps - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        stream.publish(p)
    if close:
        await asyncio.sleep(0.3)  # let the consumers catch up: close() does not drain
        stream.close("publisher done")


async def wait_until(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_http_flv_live_two_seconds() -> None:
    stream = Stream("http")
    pk = looped_packets(150, audio="g711a")
    for p in pk[:20]:  # a GOP is cached before the client comes
        stream.publish(p)
    async with flv_server(stream) as base:
        publisher = asyncio.create_task(publish_live(stream, pk[20:]))
        chunks = []
        async with ClientSession() as session:
            async with session.get(base + "/live.flv") as r:
                assert r.status == 200 and r.headers["Content-Type"] == "video/x-flv"
                assert r.headers.get("Transfer-Encoding") == "chunked"
                t0 = time.monotonic()
                async for chunk in r.content.iter_any():
                    chunks.append(chunk)
                    if time.monotonic() - t0 > 2.0:
                        break
        data = b"".join(chunks)
        await wait_until(lambda: stream.consumer_count == 0)
        publisher.cancel()
    frames, dts, _ = decode_flv(data)
    # ~2 s at 25 fps plus the cached GOP start (10 frames); the last tag may be cut off.
    assert 45 <= len(frames) <= 80
    assert {(f.width, f.height) for f in frames} == {(WIDTH, HEIGHT)}
    assert data[4] == 0x05 and dts["video"][0] == 0 and dts["video"] == sorted(dts["video"])
    assert "audio" in dts


async def test_ws_flv_live_two_seconds() -> None:
    stream = Stream("ws")
    pk = looped_packets(150)
    for p in pk[:30]:
        stream.publish(p)
    async with flv_server(stream) as base:
        publisher = asyncio.create_task(publish_live(stream, pk[30:]))
        messages = []
        async with ClientSession() as session:
            async with session.ws_connect(base + "/ws.flv") as ws:
                t0 = time.monotonic()
                while time.monotonic() - t0 < 2.0:
                    msg = await asyncio.wait_for(ws.receive(), 2)
                    assert msg.type == WSMsgType.BINARY
                    messages.append(msg.data)
        await wait_until(lambda: stream.consumer_count == 0)
        publisher.cancel()
    assert messages[0][:3] == b"FLV"
    data = b"".join(messages)
    parse_tags(data)  # every message ends on a tag boundary
    frames, dts, errors = decode_flv(data)
    assert errors == [] and 45 <= len(frames) <= 80
    assert data[4] == 0x01  # no audio in the stream: no audio flag


async def test_streams_end_cleanly_when_stream_closes() -> None:
    stream = Stream("end")
    pk = looped_packets(50, audio="g711a")
    async with flv_server(stream) as base:
        async with ClientSession() as session:
            async with session.get(base + "/live.flv") as r, session.ws_connect(base + "/ws.flv") as ws:
                await wait_until(lambda: stream.consumer_count == 2)
                publisher = asyncio.create_task(publish_live(stream, pk, fps=100, close=True))
                data = await asyncio.wait_for(r.read(), 10)  # reads to a clean end of body
                messages = []
                async for msg in ws:
                    messages.append(msg.data)
                assert ws.close_code == 1000
                await publisher
        assert stream.consumer_count == 0
        async with ClientSession() as session:
            async with session.get(base + "/live.flv") as r:
                assert r.status == 404
    tags = parse_tags(data)
    assert sum(1 for t, _, b in tags if t == 9 and b[1] == 1) == 50
    assert b"".join(messages) == data


async def test_http_client_leaving_a_silent_stream_frees_the_consumer() -> None:
    stream = Stream("silent")
    async with flv_server(stream) as base:
        async with ClientSession() as session:
            async with session.get(base + "/live.flv") as r:
                assert r.status == 200
                await wait_until(lambda: stream.consumer_count == 1)
        await wait_until(lambda: stream.consumer_count == 0, timeout=5)


async def test_slow_http_client_is_skipped_to_keyframes() -> None:
    """A client that stops reading: socket buffers fill, the hub drops, memory stays bounded."""
    aus = [a for a, *_ in encode()]
    rng = random.Random(1)
    blob = rng.randbytes(200_000).replace(b"\x00", b"\x01")
    stream = Stream("slow-client", max_lag_packets=20, gop_cache_packets=50)
    pk = []
    for i in range(400):
        key = i % 10 == 0
        au = (aus[0].split(b"\x00\x00\x00\x01\x65")[0] + b"\x00\x00\x00\x01\x65" if key
              else b"\x00\x00\x00\x01\x41") + blob[i * 100:i * 100 + 100_000]
        pk.append(MediaPacket(ps=au, timestamp=i * TICKS, keyframe=key,
                              frames=[PsFrame("video", "h264", au, i * TICKS, i * TICKS, key)]))
    async with flv_server(stream) as base:
        async with ClientSession() as session:
            async with session.get(base + "/live.flv") as r:
                await wait_until(lambda: stream.consumer_count == 1)
                consumer = stream.consumers()[0]
                for p in pk:  # 40 MB as fast as possible; the client reads nothing
                    stream.publish(p)
                    await asyncio.sleep(0)
                assert stream.buffered_packets <= 21  # the ring, not a per-client queue
                # The consumer is stuck in a write; once the client reads again, it finds
                # itself behind and skips to a recent keyframe.
                received = bytearray()

                async def read() -> None:
                    async for chunk in r.content.iter_any():
                        received.extend(chunk)

                reader = asyncio.create_task(read())
                await wait_until(lambda: consumer.dropped > 0 and consumer.lag == 0)
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
                assert consumer.dropped + consumer.packets <= len(pk)
                assert received[:3] == b"FLV"


# -- ffprobe / ffmpeg interop ----------------------------------------------------------------


@pytest.mark.interop
async def test_ffprobe_and_ffmpeg_read_http_flv_capture() -> None:
    if not (shutil.which("ffprobe") and shutil.which("ffmpeg")):
        if os.environ.get("CI") == "true":
            pytest.fail("ffprobe/ffmpeg missing on CI (scripts/test.sh installs Debian's ffmpeg)")
        pytest.skip("ffprobe/ffmpeg not installed (apt-get install -y ffmpeg)")
    stream = Stream("probe")
    pk = looped_packets(60, audio="g711a")
    async with flv_server(stream) as base:
        async with ClientSession() as session:
            async with session.get(base + "/live.flv") as r:
                await wait_until(lambda: stream.consumer_count == 1)
                publisher = asyncio.create_task(publish_live(stream, pk, fps=50, close=True))
                data = await asyncio.wait_for(r.read(), 10)
                await publisher
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "stream=codec_name,width,height,sample_rate",
         "-of", "compact", "-i", "-"], input=data, capture_output=True, timeout=60)
    assert probe.returncode == 0 and probe.stderr == b"", probe.stderr.decode(errors="replace")
    out = probe.stdout.decode()
    assert "codec_name=h264|width=320|height=240" in out and "codec_name=pcm_alaw" in out
    full = subprocess.run(["ffmpeg", "-v", "error", "-xerror", "-i", "-", "-f", "null", "-"],
                          input=data, capture_output=True, timeout=60)
    assert full.returncode == 0 and full.stderr == b"", full.stderr.decode(errors="replace")
